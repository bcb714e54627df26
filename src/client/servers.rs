//! Several server URLs for one client: servers sharing a vault are all doors to it. Requests go
//! to the preferred URL (the last one that answered); one that gets no answer moves on to the
//! next URL, and one answered `lease_held` follows the owner's URL once. [`next_url`] is the
//! one place that decides where a request goes next.

use std::sync::{Arc, Mutex};

/// Why a request leaves the URL it was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure<'a> {
    /// No answer: connection refused or reset, TLS or I/O error, or a timeout before a response.
    Unreachable,
    /// The server answered that another server holds the VM's lease, at `owner_url`.
    LeaseHeld { owner_url: &'a str },
}

impl Failure<'_> {
    fn reason(&self) -> &'static str {
        match self {
            Failure::Unreachable => "unreachable",
            Failure::LeaseHeld { .. } => "lease_held",
        }
    }
}

/// Where a request goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NextUrl {
    /// The URL at this index of the list.
    Listed(usize),
    /// A URL the list does not hold yet (an owner's URL the server named).
    New(String),
}

/// Where a request goes after `failure` at the last URL of `tried` (indices into `urls`, in the
/// order this request tried them); `followed`: the request already followed a `lease_held`
/// answer. `None`: return the error. Bounded: each URL once per request, and one owner follow.
pub(crate) fn next_url(
    urls: &[String],
    tried: &[usize],
    followed: bool,
    failure: Failure<'_>,
) -> Option<NextUrl> {
    let &last = tried.last()?;
    match failure {
        Failure::Unreachable => (1..urls.len())
            .map(|k| (last + k) % urls.len())
            .find(|i| !tried.contains(i))
            .map(NextUrl::Listed),
        Failure::LeaseHeld { owner_url } => {
            let owner = owner_url.trim_end_matches('/');
            let is_url = owner
                .strip_prefix("https://")
                .or_else(|| owner.strip_prefix("http://"))
                .is_some_and(|rest| !rest.is_empty());
            if followed || !is_url {
                return None;
            }
            // A URL this request tried already got no answer, or is the server that refused.
            match urls.iter().position(|u| u == owner) {
                Some(i) if tried.contains(&i) => None,
                Some(i) => Some(NextUrl::Listed(i)),
                None => Some(NextUrl::New(owner.to_string())),
            }
        }
    }
}

/// The URLs of one client (shared by its clones) and the preferred one.
#[derive(Debug, Clone)]
pub(crate) struct Route(Arc<Mutex<RouteState>>);

#[derive(Debug)]
struct RouteState {
    urls: Vec<String>,
    preferred: usize,
}

impl Route {
    /// `first`, then `more` (duplicates and trailing slashes dropped).
    pub(crate) fn new(first: &str, more: &[String]) -> Route {
        let mut urls: Vec<String> = Vec::with_capacity(1 + more.len());
        for u in std::iter::once(first).chain(more.iter().map(String::as_str)) {
            let u = u.trim_end_matches('/').to_string();
            if !urls.contains(&u) {
                urls.push(u);
            }
        }
        Route(Arc::new(Mutex::new(RouteState { urls, preferred: 0 })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RouteState> {
        // The state is two plain fields, consistent at every point a holder could panic.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The preferred URL and its index.
    pub(crate) fn preferred(&self) -> (usize, String) {
        let s = self.state();
        (s.preferred, s.urls[s.preferred].clone())
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.state().urls.clone()
    }

    /// The index of the URL `full` (a request's URL) starts with, and the rest of it.
    pub(crate) fn locate(&self, full: &str) -> Option<(usize, String)> {
        let s = self.state();
        s.urls.iter().enumerate().find_map(|(i, u)| {
            let rest = full.strip_prefix(u.as_str())?;
            (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
                .then(|| (i, rest.to_string()))
        })
    }

    /// Where a request that tried `tried` goes after `failure`; the preferred URL moves there
    /// (so the caller's next attempt and other requests go there too) and the move is logged.
    pub(crate) fn advance(
        &self,
        tried: &[usize],
        followed: bool,
        failure: Failure<'_>,
    ) -> Option<(usize, String)> {
        let mut s = self.state();
        let next = match next_url(&s.urls, tried, followed, failure)? {
            NextUrl::Listed(i) => i,
            NextUrl::New(u) => {
                s.urls.push(u);
                s.urls.len() - 1
            }
        };
        let from = tried.last().map(|&i| s.urls[i].clone()).unwrap_or_default();
        // Another request may have moved on already; an owner's answer always wins.
        let moved_by_other = tried.last() != Some(&s.preferred);
        if s.preferred != next && (!moved_by_other || matches!(failure, Failure::LeaseHeld { .. }))
        {
            s.preferred = next;
            tracing::info!(from = %from, to = %s.urls[next], reason = failure.reason(), "switching to another drvault server");
        }
        Some((next, s.urls[next].clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("https://s{i}:443")).collect()
    }

    #[test]
    fn unreachable_moves_on_wrapping_around_each_url_once() {
        let u = urls(3);
        let next = |tried: &[usize]| next_url(&u, tried, false, Failure::Unreachable);
        assert_eq!(next(&[0]), Some(NextUrl::Listed(1)));
        assert_eq!(next(&[0, 1]), Some(NextUrl::Listed(2)));
        assert_eq!(next(&[0, 1, 2]), None);
        // Starting at the preferred URL 2, the list wraps to 0 and 1.
        assert_eq!(next(&[2]), Some(NextUrl::Listed(0)));
        assert_eq!(next(&[2, 0]), Some(NextUrl::Listed(1)));
        assert_eq!(next(&[2, 0, 1]), None);
        assert_eq!(next_url(&urls(1), &[0], false, Failure::Unreachable), None);
        assert_eq!(next(&[]), None);
    }

    #[test]
    fn lease_held_follows_the_owner_once() {
        let u = urls(3);
        fn held(owner_url: &str) -> Failure<'_> {
            Failure::LeaseHeld { owner_url }
        }
        assert_eq!(
            next_url(&u, &[0], false, held("https://s2:443/")),
            Some(NextUrl::Listed(2))
        );
        assert_eq!(
            next_url(&u, &[0], false, held("https://s9:4431")),
            Some(NextUrl::New("https://s9:4431".into()))
        );
        // Once per request; never back to a URL it tried; only URLs.
        assert_eq!(next_url(&u, &[0, 2], true, held("https://s1:443")), None);
        assert_eq!(next_url(&u, &[1, 0], false, held("https://s1:443")), None);
        assert_eq!(next_url(&u, &[0], false, held("https://s0:443")), None);
        assert_eq!(next_url(&u, &[0], false, held("s1:443")), None);
        assert_eq!(next_url(&u, &[0], false, held("")), None);
        // After following, an unreachable owner still moves on to what was not tried.
        assert_eq!(
            next_url(&u, &[0, 2], true, Failure::Unreachable),
            Some(NextUrl::Listed(1))
        );
    }

    #[test]
    fn the_route_remembers_where_it_moved() {
        let r = Route::new(
            "https://s0:443/",
            &["https://s1:443".into(), "https://s0:443".into()],
        );
        assert_eq!(r.urls(), vec!["https://s0:443", "https://s1:443"]);
        assert_eq!(r.preferred().0, 0);
        assert_eq!(
            r.locate("https://s1:443/v1/vms?x=1"),
            Some((1, "/v1/vms?x=1".into()))
        );
        assert_eq!(r.locate("https://s1:4430/v1/vms"), None);
        assert_eq!(
            r.advance(&[0], false, Failure::Unreachable),
            Some((1, "https://s1:443".into()))
        );
        assert_eq!(r.preferred().0, 1);
        // A request still on the old URL fails later: it moves on, the preferred URL stays.
        assert_eq!(
            r.advance(&[0], false, Failure::Unreachable).map(|n| n.0),
            Some(1)
        );
        assert_eq!(
            r.advance(
                &[1],
                false,
                Failure::LeaseHeld {
                    owner_url: "https://s7:1"
                }
            ),
            Some((2, "https://s7:1".into()))
        );
        assert_eq!(r.preferred(), (2, "https://s7:1".into()));
    }
}
