"""Writes a random rank-r LoRA adapter for the Llama-3.1-8B shape in PEFT's file format
(adapter_config.json + adapter_model.safetensors, bf16), for lab serve smoke runs on the GPU
machine, where no adapter for the synthetic base exists. Random values: for plumbing and speed,
never for quality.

    python3 bench/make_peft_adapter.py OUT_DIR [RANK] [SEED]
    python3 bench/make_peft_adapter.py --many PARENT_DIR RANK COUNT   # PARENT_DIR/customer-01..COUNT, seeds 1..COUNT
"""
import json, os, sys
import torch
from safetensors.torch import save_file

h, inter, kv, layers = 4096, 14336, 1024, 32
dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def write(out, r, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for m, (fan_in, fan_out) in dims.items():
            parent = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            p = f"base_model.model.model.layers.{i}.{parent}.{m}"
            tensors[f"{p}.lora_A.weight"] = ((torch.rand(r, fan_in, generator=g) * 2 - 1) / fan_in ** 0.5).to(torch.bfloat16)
            tensors[f"{p}.lora_B.weight"] = ((torch.rand(fan_out, r, generator=g) * 2 - 1) * 0.01).to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "target_modules": list(dims), "base_model_name_or_path": "synthetic:llama-3.1-8b", "inference_mode": True}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote rank-{r} adapter ({sum(t.numel() for t in tensors.values())} parameters) to {out}")


if sys.argv[1] == "--many":
    parent, r, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for i in range(1, count + 1):
        write(os.path.join(parent, f"customer-{i:02d}"), r, i)
else:
    write(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
