#!/usr/bin/env python3
"""Hugging Face PEFT peer of `lab train-lora`: same data, same budget, same machine.

What it is
----------
Trains a LoRA adapter on SmolLM2-135M-Instruct with transformers + PEFT (CPU, float32), doing what
`lab train-lora` does so the two can be compared side by side (accuracy and tokens/s):

* base model and tokenizer from the same GGUF file lab uses (dequantized to float32 by
  transformers); the tokenizer's pre-tokenizer is replaced by SmolLM2's digit split
  (``Sequence([Digits(individual_digits=True), ByteLevel(...)])``, as
  tests/fixtures/make_tokenizer_fixture.py does) so token ids equal lab's;
* data: ``datasets/<domain>/train.jsonl`` with the domain's canonical system message inserted
  first (the strings of src/datasets/system.rs, checked against the README's verbatim copy);
* examples as src/train/examples.rs: prompt = chat template of messages[:-1] with the generation
  prompt, full = chat template of all messages; the prompt must be a token prefix of full; keep up
  to and including the first end-of-turn token after the prompt; truncate to --max-seq-len (512);
  loss only on the tokens after the prompt;
* lab's defaults: LoRA r=16, alpha=32, q/k/v/o/gate/up/down_proj, no dropout; AdamW (0.9, 0.999,
  eps 1e-8, weight decay 0, no gradient clipping), lr 1e-3, linear warm-up (--warmup, lab's
  default 10) then cosine decay to 0 over the run's steps (lab's ``lr_at``: warm-up step s uses
  lr*(s+1)/warmup; ``--schedule hf`` uses transformers' get_cosine_schedule_with_warmup instead,
  whose first step has lr 0); batch 8; one seeded permutation of the examples per epoch (torch's
  RNG, so the order is not lab's ChaCha order: same data, not the same batches); loss = mean
  over all loss tokens of the batch (HF causal-LM loss with shifted labels, -100 ignored), which
  is lab's masked cross-entropy.

Differences that remain by construction: PEFT pads each batch on the right to its longest
sequence (pad = eos id, attention mask 0, labels -100) where lab packs without padding and runs
the system-message prefix shared by the batch only once; the LoRA A init is PEFT's (kaiming
uniform from torch's RNG, B = 0) with another RNG than lab's.

Side-by-side (from the repo root, nothing else running on the machine)::

    lab train-lora --domain A --out bench/out/lab-a --max-steps 100
    python3 bench/peft_train.py --domain A --out bench/out/peft-a --max-steps 100 --threads 2

or with a wall budget, which stops after the step that reaches it and still saves (the steps done
are printed and written to summary.json; the cosine schedule spans --max-steps when given, else
one epoch, lab's default of ceil(2000/8) = 250 steps, so give lab the same --max-steps)::

    python3 bench/peft_train.py --domain A --out bench/out/peft-a --minutes 12 --threads 2

Evaluate either adapter with lab's exact scorer::

    lab eval --domain A --adapter bench/out/peft-a

Outputs in --out: adapter_config.json + adapter_model.safetensors (PEFT LoRA, no
modules_to_save; the auto README.md model card is deleted), metrics.jsonl (one line per step:
step, loss, lr, tokens, tokens_per_s, elapsed_s), summary.json.

tokens/s counts the non-pad tokens of the full sequences (prompt + answer) of every example
processed, divided by the wall seconds of the training loop; lab counts all tokens of every
example (it has no padding), the same definition.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = "~/.cache/lab/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAIN_DIRS = {"A": "a-sql", "B": "b-triage", "C": "c-tools"}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Verbatim copies of src/datasets/system.rs (a Rust `\` line continuation drops the newline and
# the next line's indentation, so those lines are joined here); checked against the README.
SYSTEM = {
    "A": (
        "You translate questions about a shop into one SQLite query.\n"
        "Schema:\n"
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, country TEXT, signup_date TEXT);\n"
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL);\n"
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, order_date TEXT, status TEXT);\n"
        "CREATE TABLE order_items (order_id INTEGER, product_id INTEGER, quantity INTEGER);\n"
        "Dates are TEXT in YYYY-MM-DD format. orders.status is one of 'pending', 'shipped', 'delivered', 'cancelled'. "
        "products.category is one of 'Books', 'Electronics', 'Toys', 'Garden', 'Kitchen', 'Sports', 'Clothing', 'Beauty', "
        "'Music', 'Office'. customers.country is the full English name, e.g. 'United States', 'United Kingdom', 'Netherlands'.\n"
        "Answer with a single SELECT statement on one line and nothing else."
    ),
    "B": (
        "You triage customer support messages. "
        'Answer with JSON only: {"category": C, "priority": P}.\n'
        "Categories: billing (charges, invoices, payment methods), shipping (delivery, tracking, lost or damaged parcels), "
        "technical (app or site errors, bugs, outages), account (login, password, profile, deletion), refund (money back, returns).\n"
        "Priorities: low (no rush, a question), medium (an ordinary problem), high (blocking the customer, angry, repeated), "
        "urgent (outage, security, money lost now, legal threat)."
    ),
    "C": (
        "You turn a request into one tool call. "
        'Answer with JSON only: {"name": TOOL, "arguments": {...}}.\n'
        "Tools:\n"
        'get_weather(city: string, unit: "celsius" | "fahrenheit") - unit is celsius unless the request says otherwise\n'
        "convert_currency(amount: number, from: ISO 4217 code, to: ISO 4217 code)\n"
        "create_event(title: string, date: YYYY-MM-DD, time: HH:MM, 24-hour)\n"
        "set_timer(minutes: integer)\n"
        "search_flights(origin: IATA code, destination: IATA code, date: YYYY-MM-DD)\n"
        "Airports: London LHR, Paris CDG, New York JFK, Los Angeles LAX, Tokyo HND, Berlin BER, Madrid MAD, Rome FCO, "
        "Amsterdam AMS, Frankfurt FRA, Dubai DXB, Singapore SIN, Sydney SYD, Toronto YYZ, Chicago ORD, San Francisco SFO, "
        "Barcelona BCN, Lisbon LIS, Istanbul IST, Seoul ICN."
    ),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", required=True, choices=sorted(DOMAIN_DIRS), type=str.upper)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-steps", type=int, help="optimizer steps (schedule length); default one epoch")
    p.add_argument("--minutes", type=float, help="wall budget of the training loop; stops after the step that reaches it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gguf", default=DEFAULT_GGUF)
    p.add_argument("--datasets-dir", type=Path, default=REPO / "datasets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (lab's default: 10)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--limit", type=int, help="use only the first N training examples (smoke tests)")
    p.add_argument("--schedule", choices=["lab", "hf"], default="lab",
                   help="lab: lr*(s+1)/warmup during warm-up (lab's lr_at); hf: get_cosine_schedule_with_warmup")
    a = p.parse_args()
    if a.max_steps is None and a.minutes is None:
        p.error("pass --max-steps N and/or --minutes M")
    if a.batch_size < 1 or a.rank < 1 or (a.max_steps is not None and a.max_steps < 1):
        p.error("--batch-size, --rank and --max-steps must be at least 1")
    return a


def system_message(domain: str, datasets_dir: Path) -> str:
    """The canonical system message; asserts it equals the README's verbatim ```text block."""
    text = SYSTEM[domain]
    readme = datasets_dir / DOMAIN_DIRS[domain] / "README.md"
    if readme.is_file():
        body = readme.read_text(encoding="utf-8")
        section = body.split("## Canonical system message", 1)
        assert len(section) == 2, f"{readme}: no 'Canonical system message' section"
        block = section[1].split("```text\n", 1)[1].split("\n```", 1)[0]
        assert block == text, f"system message of {domain} differs from {readme}'s verbatim block"
    else:
        print(f"peft_train: {readme} not found; system message not cross-checked", file=sys.stderr)
    return text


def load_tokenizer(gguf: Path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    assert "Digits" in str(tok.backend_tokenizer.pre_tokenizer), "pre-tokenizer replacement did not take"
    check_fixture(tok, gguf)
    return tok


def check_fixture(tok, gguf: Path):
    """When the GGUF is the fixture's model, its recorded digit-split ids must come back."""
    fixture = REPO / "tests/fixtures/tokenizer_ids.json"
    if gguf.name != Path(DEFAULT_GGUF).name or not fixture.is_file():
        return
    cases = json.loads(fixture.read_text(encoding="utf-8"))["cases"]
    bad = [c["text"] for c in cases if tok.encode(c["text"], add_special_tokens=False) != c["digit_split_ids"]]
    assert not bad, f"tokenizer ids differ from {fixture} for {bad!r}"


def eos_ids(tok, gguf: Path) -> set:
    """lab's eos set: the GGUF's eos and eot ids plus the eos token's id."""
    ids = {tok.eos_token_id}
    try:
        from gguf import GGUFReader

        r = GGUFReader(str(gguf))
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            f = r.fields.get(key)
            if f is not None:
                ids.add(int(f.parts[f.data[0]][0]))
    except ImportError:
        pass
    ids.discard(None)
    return ids


def tokenize_example(tok, messages, max_len, eos):
    """src/train/examples.rs: (ids, labels) with -100 on the prompt."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an example must end with an assistant message (the target)")
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    ids = tok.encode(full, add_special_tokens=False)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template's prompt is not a token prefix of the conversation")
    if not tok.encode(messages[-1]["content"], add_special_tokens=False):
        raise ValueError("empty assistant answer")
    for p in range(len(prompt_ids), len(ids)):
        if ids[p] in eos:
            ids = ids[: p + 1]
            break
    ids = ids[:max_len]
    labels = [-100 if t < len(prompt_ids) else i for t, i in enumerate(ids)]
    if all(l == -100 for l in labels):
        raise ValueError(f"prompt alone is longer than --max-seq-len {max_len}")
    return ids, labels


def load_examples(args, tok, eos):
    path = args.datasets_dir / DOMAIN_DIRS[args.domain] / "train.jsonl"
    system = system_message(args.domain, args.datasets_dir)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if args.limit is not None and len(out) >= args.limit:
                break
            ex = json.loads(line)
            msgs = [{"role": m["role"], "content": m["content"]} for m in ex["messages"]]
            if not any(m["role"] == "system" for m in msgs):
                msgs.insert(0, {"role": "system", "content": system})
            try:
                out.append(tokenize_example(tok, msgs, args.max_seq_len, eos))
            except ValueError as e:
                sys.exit(f"peft_train: {path} line {n}: {e}")
    return path, out


class Order:
    """One seeded permutation per epoch, concatenated (lab's scheme, torch's RNG)."""

    def __init__(self, n, seed):
        self.n, self.seed, self.perms = n, seed, {}

    def example(self, g):
        epoch, i = divmod(g, self.n)
        if epoch not in self.perms:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self.perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
        return self.perms[epoch][i]


def collate(batch, pad_id):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(batch):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(ids)] = 1
    return input_ids, mask, labels


def lab_lr(step, total, warmup, peak):
    """src/train/optim.rs `lr_at` (0-based step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gguf = Path(os.path.expanduser(args.gguf)).resolve()
    if not gguf.is_file():
        sys.exit(f"peft_train: GGUF not found: {gguf} (pass --gguf)")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    tok = load_tokenizer(gguf)
    eos = eos_ids(tok, gguf)
    path, examples = load_examples(args, tok, eos)
    if not examples:
        sys.exit("peft_train: no training examples")
    n_tok = sum(len(i) for i, _ in examples)
    n_loss = sum(sum(1 for l in lab if l != -100) for _, lab in examples)
    total = args.max_steps if args.max_steps is not None else math.ceil(len(examples) / args.batch_size)
    print(
        f"peft_train: {len(examples)} examples ({n_tok} tokens, {n_loss} with loss) from {path}; "
        f"schedule {total} steps of {args.batch_size}"
        + (f", wall budget {args.minutes} min" if args.minutes is not None else "")
        + f"; eos ids {sorted(eos)}; {args.threads} threads",
        file=sys.stderr,
    )

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(args.seed)  # LoRA init independent of what loading consumed
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=TARGET_MODULES,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    print(f"peft_train: {n_params} trainable LoRA parameters", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if args.schedule == "hf":
        sched = get_cosine_schedule_with_warmup(opt, args.warmup, total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lab_lr(s, total, args.warmup, 1.0))

    args.out.mkdir(parents=True, exist_ok=True)
    order = Order(len(examples), args.seed)
    pad_id = tok.eos_token_id
    budget = args.minutes * 60.0 if args.minutes is not None else math.inf
    tokens, steps, last_loss, stopped_by = 0, 0, float("nan"), "max_steps"
    with open(args.out / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        t0 = time.perf_counter()
        for step in range(total):
            if time.perf_counter() - t0 >= budget:
                stopped_by = "minutes"
                break
            first = step * args.batch_size
            batch = [examples[order.example(g)] for g in range(first, first + args.batch_size)]
            input_ids, mask, labels = collate(batch, pad_id)
            tokens += int(mask.sum())
            lr = opt.param_groups[0]["lr"]
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            last_loss, steps = loss.item(), step + 1
            secs = time.perf_counter() - t0
            line = {"step": steps, "loss": last_loss, "lr": lr, "tokens": tokens,
                    "tokens_per_s": tokens / max(secs, 1e-9), "elapsed_s": secs}
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            print(f"step {steps}/{total} loss {last_loss:.4f} lr {lr:.2e} {line['tokens_per_s']:.0f} tok/s", file=sys.stderr)
        seconds = time.perf_counter() - t0
    if steps == total and args.minutes is not None and seconds >= budget:
        stopped_by = "minutes"  # the last scheduled step also used up the budget

    model.peft_config["default"].base_model_name_or_path = str(gguf)  # else the GGUF's folder
    model.save_pretrained(str(args.out), save_embedding_layers=False)
    (args.out / "README.md").unlink(missing_ok=True)
    saved = json.loads((args.out / "adapter_config.json").read_text())
    assert saved.get("peft_type") == "LORA" and not saved.get("modules_to_save") and not saved.get("use_dora"), saved
    tps = tokens / max(seconds, 1e-9)
    summary = {"domain": args.domain, "steps": steps, "schedule_steps": total, "stopped_by": stopped_by,
               "seconds": seconds, "tokens": tokens, "tokens_per_s": tps, "final_loss": last_loss,
               "examples": len(examples), "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
               "schedule": args.schedule, "seed": args.seed, "threads": args.threads, "gguf": str(gguf),
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "peft": __import__("peft").__version__}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"peft trained {steps} steps in {seconds:.1f} s ({tps:.0f} tokens/s), final loss {last_loss:.4f}; "
          f"adapter written to {args.out}" + (f" (stopped by the {args.minutes} min budget)" if stopped_by == "minutes" else ""))


if __name__ == "__main__":
    main()
