//! Whom a request is for: the tenant that `--scheduling-policy fair`,
//! `--max-running-per-tenant`, `--max-waiting-per-model` and `--tenant-rate-limit` count it
//! under.
//!
//! In order: the `x-tenant-id` header, else the body's `user` (OpenAI's end-user id), else the
//! `model` (an adapter's name, or the base model's served name). The header comes first
//! because it is what a gateway in front of the server sets once it has authenticated the
//! caller, while `user` is whatever the client writes: behind such a gateway, clients cannot
//! move themselves to another tenant's share. Without one, a client can (by sending another
//! `user`), so the per-tenant limits are a fairness tool between cooperating clients, not a
//! defence against a hostile one.
//!
//! Tenants and models share one namespace: a request with `x-tenant-id: sql` is counted with
//! the requests to the adapter `sql` that name no tenant.

use axum::http::HeaderMap;

use super::error::ApiError;

/// The header that names a request's tenant.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// Characters a tenant is at most.
pub const MAX_TENANT_LEN: usize = 128;

/// Why `name` cannot be a tenant, if it cannot: it must be 1-128 printable ASCII characters,
/// no space, quote, backquote, backslash or comma (the rule for adapter names, widened to
/// the rest of printable ASCII), so it is safe as a Prometheus label value, in a
/// comma-separated list and in a log line. Every valid adapter name is a valid tenant
/// (the default tenant is the model), and so are the usual `user` ids: hashes, UUIDs, e-mail
/// addresses.
pub fn invalid_tenant(name: &str) -> Option<String> {
    let ok = |c: char| c.is_ascii_graphic() && !"\"'`\\,".contains(c);
    if name.is_empty() || name.len() > MAX_TENANT_LEN || !name.chars().all(ok) {
        return Some(format!(
            "invalid tenant `{}`: use 1-{MAX_TENANT_LEN} printable ASCII characters without spaces, quotes, backslashes or commas",
            name.chars().take(MAX_TENANT_LEN + 12).collect::<String>()
        ));
    }
    None
}

/// The `x-tenant-id` header's value, if sent. A 400 naming the header when it is sent twice
/// (which one would count?), empty (a gateway filling it from an unset variable: counting the
/// request for its model instead would hide that), or not a valid tenant.
pub fn from_header(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(TENANT_HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::bad(TENANT_HEADER, format!("send one `{TENANT_HEADER}` header, not several")));
    }
    let text = value.to_str().map_err(|_| {
        ApiError::bad(TENANT_HEADER, format!("`{TENANT_HEADER}` must be printable ASCII (an id, not a display name)"))
    })?;
    match invalid_tenant(text) {
        None => Ok(Some(text.to_string())),
        Some(why) => Err(ApiError::bad(TENANT_HEADER, format!("`{TENANT_HEADER}` header: {why}"))),
    }
}

/// The tenant of a request to `model`: the header's value (already checked by
/// [`from_header`]), else `user`, else `model`. An empty `user` counts as none (some clients
/// send `""` for "not set"); any other invalid `user` is a 400 naming `user`.
pub fn resolve(header: Option<String>, user: Option<&str>, model: &str) -> Result<String, ApiError> {
    if let Some(t) = header {
        return Ok(t);
    }
    match user.filter(|u| !u.is_empty()) {
        Some(u) => match invalid_tenant(u) {
            None => Ok(u.to_string()),
            Some(why) => Err(ApiError::bad("user", format!("`user` is the request's tenant: {why}"))),
        },
        None => Ok(model.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn param(e: ApiError) -> Option<String> {
        e.body().error.param
    }

    #[test]
    fn the_header_beats_user_which_beats_the_model() {
        assert_eq!(resolve(Some("gw".into()), Some("u"), "m").unwrap(), "gw");
        assert_eq!(resolve(None, Some("alice@example.com"), "m").unwrap(), "alice@example.com");
        assert_eq!(resolve(None, Some(""), "m").unwrap(), "m", "an empty user is no user");
        assert_eq!(resolve(None, None, "customer-01").unwrap(), "customer-01");
        for bad in ["a b", "a,b", "a\"b", "a'b", "a\\b", "é", "a\nb", &"x".repeat(129)] {
            assert_eq!(param(resolve(None, Some(bad), "m").unwrap_err()).as_deref(), Some("user"), "{bad:?}");
        }
        assert!(invalid_tenant(&"x".repeat(128)).is_none());
        for name in ["customer-01", "org/model:v2", "a.b_c", "3f2a9c", "550e8400-e29b-41d4-a716-446655440000"] {
            assert!(invalid_tenant(name).is_none() && crate::serve::catalog::invalid_adapter_name(name).is_none());
        }
    }

    #[test]
    fn a_bad_header_is_a_400_naming_it() {
        let mut h = HeaderMap::new();
        assert_eq!(from_header(&h).unwrap(), None);
        h.insert(TENANT_HEADER, HeaderValue::from_static("team-7"));
        assert_eq!(from_header(&h).unwrap().as_deref(), Some("team-7"));
        for bad in ["", "a b", "a,b", "\"q\""] {
            h.insert(TENANT_HEADER, HeaderValue::from_str(bad).unwrap());
            assert_eq!(param(from_header(&h).unwrap_err()).as_deref(), Some(TENANT_HEADER), "{bad:?}");
        }
        h.insert(TENANT_HEADER, HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert!(from_header(&h).is_err(), "not ASCII");
        h.insert(TENANT_HEADER, HeaderValue::from_static("a"));
        h.append(TENANT_HEADER, HeaderValue::from_static("b"));
        assert!(from_header(&h).unwrap_err().to_string().contains("not several"));
    }
}
