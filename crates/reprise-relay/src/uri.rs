//! Query strings: a leaf below every handler; imports nothing of the crate.

use percent_encoding::percent_decode_str;

/// Value of a query parameter, percent-decoded (`+` as space).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode_str(&k.replace('+', " "))
            .decode_utf8()
            .ok()?
            .into_owned();
        if k != name {
            return None;
        }
        Some(
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8()
                .ok()?
                .into_owned(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(
            query_param("a=1&last_event_id=x%2Ey&b", "last_event_id").as_deref(),
            Some("x.y")
        );
        assert_eq!(query_param("chat=a+b", "chat").as_deref(), Some("a b"));
        assert_eq!(query_param("b", "b").as_deref(), Some(""));
        assert_eq!(query_param("a=1", "b"), None);
    }
}
