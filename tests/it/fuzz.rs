//! Fuzzing on the stable toolchain (proptest): every parser that reads what
//! a stranger sends, or what a user writes, gets arbitrary and mutated
//! input. Seeds are real examples (requests signed the way each provider
//! signs them, by `spillway send`'s signer; a real endpoints file); the
//! mutations flip, insert and delete bytes.
//!
//! Properties: nothing panics; a request signed with the endpoint's secret
//! verifies; any change to a signed body makes it fail; durations round
//! trip. A failure is shrunk and saved in `tests/proptest-regressions/fuzz.txt`,
//! and replayed first on every later run (a regression test).
//!
//! `make test` runs the default number of cases (`PROPTEST_CASES`, 256 per
//! property; a few seconds). `make fuzz` runs the long form.

use std::path::Path;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;
use spillway_api::{GenericHmac, HandshakeType, HmacAlgorithm, Scheme, SignatureEncoding};
use spillway_cli::sign::{Request, headers as provider_headers};
use spillway_gateway::handshake::{after_verify, before_verify};
use spillway_gateway::route::Router;
use spillway_gateway::source::FileSource;
use spillway_gateway::verify::{Failure, Inbound, Verifier};

const SECRET: &[u8] = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: i64 = 1_700_000_000;
const TWILIO_URL: &str = "https://hooks.example.com/in/twilio";

/// The schemes whose signature covers the body.
const BODY_SIGNED: [Scheme; 8] = [
    Scheme::Github,
    Scheme::Stripe,
    Scheme::Slack,
    Scheme::StandardWebhooks,
    Scheme::Shopify,
    Scheme::Twitch,
    Scheme::Twilio,
    Scheme::Hmac,
];

fn generic() -> GenericHmac {
    GenericHmac {
        header: "X-Signature".into(),
        algorithm: HmacAlgorithm::Sha256,
        encoding: SignatureEncoding::Hex,
        prefix: Some("sha256=".into()),
        signed_content: "{timestamp}.{body}".into(),
        timestamp_header: Some("X-Timestamp".into()),
    }
}

fn verifier(scheme: Scheme) -> Verifier {
    let g = generic();
    Verifier::new(
        scheme,
        vec![SECRET.to_vec()],
        300,
        Some(TWILIO_URL.into()),
        (scheme == Scheme::Hmac).then_some(&g),
    )
    .expect("a valid verifier")
}

/// Headers (and the query, for Twilio) a provider would send for `body`.
fn signed(scheme: Scheme, body: &[u8], id: &str) -> (HeaderMap, Option<String>) {
    let g = generic();
    // Twilio signs a JSON body through a bodySHA256 in the URL.
    let query = (scheme == Scheme::Twilio).then(|| {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(body);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("bodySHA256={hex}")
    });
    let url = match &query {
        Some(q) => format!("{TWILIO_URL}?{q}"),
        None => TWILIO_URL.to_owned(),
    };
    let pairs = provider_headers(
        scheme,
        SECRET,
        &Request {
            body,
            content_type: "application/json",
            now: NOW,
            id,
            url: &url,
        },
        (scheme == Scheme::Hmac).then_some(&g),
    )
    .expect("the signer knows the scheme");
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    for (k, v) in pairs {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(&v).expect("header value"),
        );
    }
    (h, query)
}

fn check(v: &Verifier, h: &HeaderMap, body: &[u8], query: Option<&str>) -> Result<(), Failure> {
    v.verify(&Inbound {
        headers: h,
        body,
        query,
        now_unix: NOW,
    })
}

/// A byte string with a few random edits: flips, inserts, deletes.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((any::<u8>(), any::<usize>(), 0u8..3), 1..6).prop_map(move |edits| {
        let mut out = seed.clone();
        for (byte, at, kind) in edits {
            let i = if out.is_empty() { 0 } else { at % out.len() };
            match kind {
                0 if !out.is_empty() => out[i] ^= byte | 1,
                1 => out.insert(i.min(out.len()), byte),
                _ if !out.is_empty() => {
                    out.remove(i);
                }
                _ => out.push(byte),
            }
        }
        out
    })
}

fn scheme() -> impl Strategy<Value = Scheme> {
    prop::sample::select(BODY_SIGNED.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Failures are kept here and replayed first on every run.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("proptest-regressions/fuzz.txt"),
        )),
        ..ProptestConfig::default()
    })]

    /// Signed as the provider signs, a request verifies; any edit to the
    /// body makes it fail.
    #[test]
    fn signed_bodies_verify_and_edited_ones_do_not(
        scheme in scheme(),
        body in prop::collection::vec(any::<u8>(), 0..512),
        id in "[a-zA-Z0-9_-]{1,40}",
        edits in prop::collection::vec((any::<u8>(), any::<usize>()), 1..4),
    ) {
        let v = verifier(scheme);
        let (h, query) = signed(scheme, &body, &id);
        prop_assert_eq!(check(&v, &h, &body, query.as_deref()), Ok(()));
        let mut edited = body.clone();
        for (byte, at) in edits {
            if edited.is_empty() {
                edited.push(byte);
            } else {
                let i = at % edited.len();
                edited[i] ^= byte | 1;
            }
        }
        // Two edits of one byte can cancel out.
        prop_assume!(edited != body);
        prop_assert!(check(&v, &h, &edited, query.as_deref()).is_err());
    }

    /// Mutated signature headers (seeded with real ones) and arbitrary
    /// values never panic a verifier, whatever they decode to.
    #[test]
    fn mutated_signature_headers_never_panic(
        scheme in scheme(),
        which in any::<usize>(),
        value in mutated(b"sha256=0123456789abcdef".to_vec()),
        junk in "\\PC{0,200}",
    ) {
        let v = verifier(scheme);
        let body = br#"{"id":"evt_1","type":"ping"}"#;
        let (mut h, query) = signed(scheme, body, "msg_1");
        let names: Vec<HeaderName> = h.keys().cloned().collect();
        let name = names[which % names.len()].clone();
        let real = h.get(&name).map(|v| v.as_bytes().to_vec()).unwrap_or_default();
        for candidate in [value, real.into_iter().rev().collect(), junk.into_bytes()] {
            if let Ok(hv) = HeaderValue::from_bytes(&candidate) {
                h.insert(name.clone(), hv);
                let _ = check(&v, &h, body, query.as_deref());
            }
        }
    }

    /// The generic HMAC template: any signed-content template, header and
    /// prefix builds a verifier or a clear error, and verifying with it
    /// never panics.
    #[test]
    fn generic_hmac_templates_never_panic(
        template in "(\\{body\\}|\\{timestamp\\}|\\{header:[A-Za-z-]{0,12}\\}|\\{|\\}|[a-z.:]{0,6}){0,8}",
        header in "[A-Za-z-]{1,20}",
        prefix in proptest::option::of("[ -~]{0,12}"),
        encoding in prop::sample::select(vec![SignatureEncoding::Hex, SignatureEncoding::Base64]),
        sig in "[ -~]{0,120}",
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let g = GenericHmac {
            header: header.clone(),
            algorithm: HmacAlgorithm::Sha256,
            encoding,
            prefix,
            timestamp_header: template.contains("{timestamp}").then(|| "X-Ts".into()),
            signed_content: template,
        };
        if let Ok(v) = Verifier::new(Scheme::Hmac, vec![SECRET.to_vec()], 300, None, Some(&g)) {
            let mut h = HeaderMap::new();
            if let (Ok(n), Ok(val)) = (HeaderName::from_bytes(header.as_bytes()), HeaderValue::from_str(&sig)) {
                h.insert(n, val);
            }
            h.insert("x-ts", HeaderValue::from_static("1700000000"));
            let _ = check(&v, &h, &body, None);
        }
    }

    /// Handshake bodies and queries: whatever arrives, an answer or none,
    /// never a panic.
    #[test]
    fn handshakes_never_panic(
        kind in prop::sample::select(vec![
            HandshakeType::SlackUrlVerification,
            HandshakeType::MetaHubChallenge,
            HandshakeType::ZoomUrlValidation,
            HandshakeType::MsGraphValidationToken,
            HandshakeType::TwitchCallbackVerification,
        ]),
        get in any::<bool>(),
        query in proptest::option::of("[ -~]{0,200}"),
        body in prop_oneof![
            mutated(br#"{"type":"url_verification","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}"#.to_vec()),
            mutated(br#"{"event":"endpoint.url_validation","payload":{"plainToken":"qgg8vlvZRS6UYooatFL8Aw"}}"#.to_vec()),
            mutated(br#"{"challenge":"pogchamp-kappa-360noscope-vohiyo","subscription":{"id":"f1c2a387"}}"#.to_vec()),
            prop::collection::vec(any::<u8>(), 0..256),
        ],
    ) {
        let method = if get { Method::GET } else { Method::POST };
        let _ = before_verify(kind, &method, query.as_deref(), Some(b"verify-token"));
        let mut h = HeaderMap::new();
        h.insert("twitch-eventsub-message-type", HeaderValue::from_static("webhook_callback_verification"));
        let _ = after_verify(kind, &h, &body, Some(b"zoom-secret"));
    }

    /// Path routing: any path is looked up without panicking, and only
    /// the exact configured path matches.
    #[test]
    fn routing_any_path_never_panics(path in "(/|[a-zA-Z0-9._~%-]{0,12}|\\.\\.){0,12}") {
        let table = routed().table();
        let hit = table.get(&path);
        prop_assert_eq!(hit.is_some(), path == "/in/github");
    }

    /// The standalone endpoints file: mutated real files and arbitrary
    /// text are loaded or refused with an error, never a panic.
    #[test]
    fn endpoints_files_never_panic(
        text in prop_oneof![
            mutated(ENDPOINTS_FILE.as_bytes().to_vec()),
            "\\PC{0,400}".prop_map(String::into_bytes),
        ],
    ) {
        let _ = FileSource::parse(Path::new("endpoints.yaml"), &text, None);
    }

    /// Retry-After (seconds or an HTTP date) and Spillway's durations:
    /// arbitrary text never panics; durations print and parse back.
    #[test]
    fn retry_after_and_durations_never_panic(
        text in prop_oneof![
            "[0-9]{0,25}",
            "\\PC{0,60}",
            mutated(b"Wed, 21 Oct 2015 07:28:00 GMT".to_vec())
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            mutated(b"1h30m".to_vec()).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        millis in 0u64..(400 * 24 * 3600 * 1000),
    ) {
        let _ = spillway_processor::outcome::parse_retry_after(&text, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let _ = spillway_api::duration::parse(&text);
        let d = Duration::from_millis(millis);
        prop_assert_eq!(spillway_api::duration::parse(&spillway_api::duration::format(d)), Ok(d));
    }

    /// The stored format (a webhook's metadata and its provider's headers
    /// in front of its body): any headers a request can carry and any body
    /// read back as written; mutated and arbitrary payloads are read or
    /// refused as malformed, never a panic, never a body outside the payload.
    #[test]
    fn stored_webhooks_round_trip_and_mutations_never_panic(
        headers in proptest::collection::vec(("[!#$%&'*+.^_`|~0-9a-z-]{1,20}", "[ -~\t]{0,80}"), 0..12),
        body in proptest::collection::vec(any::<u8>(), 0..300),
        id in "[!-~]{1,40}",
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        use spillway_api::stored;
        let meta = stored::Metadata {
            endpoint: "ns/name",
            delivery_id: &id,
            received_at: "2026-12-06T09:00:00.123Z",
            content_type: Some("application/json"),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate: None,
            ordering_key: Some(&id),
        };
        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        let p = stored::encode(&meta, pairs, &body);
        let w = stored::decode_v2(&p).expect("what encode writes decodes");
        prop_assert_eq!(&w.headers, &headers);
        prop_assert_eq!(w.body(&p), body.as_slice());
        prop_assert_eq!(w.delivery_id.as_deref(), Some(id.as_str()));
        prop_assert_eq!(w.ordering_key.as_deref(), Some(id.as_str()));
        // Mutated: read or refused, and a body within the payload.
        let mut m = p.clone();
        for (i, b) in flips {
            let i = i.index(m.len());
            m[i] = b;
        }
        if let Ok(w) = stored::decode_v2(&m) {
            prop_assert!(w.body_offset <= m.len());
        }
        let _ = stored::decode(None, &m);
    }
}

const ENDPOINTS_FILE: &str = r#"apiVersion: v1
kind: Secret
metadata: {name: keys, namespace: local}
stringData: {github: "It's a Secret to Everybody"}
---
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {name: github, namespace: local}
spec:
  path: /in/github
  verification: {scheme: github, secretRefs: [{name: keys, key: github}]}
  deduplication: {window: 10m}
  ordering: {keyJsonPointer: /repository/id, partitions: 4}
  processor: {sink: {url: "http://127.0.0.1:8080/hooks"}, concurrency: 8}
"#;

/// A router holding the endpoints file's one route.
fn routed() -> &'static Router {
    static ROUTER: std::sync::OnceLock<Router> = std::sync::OnceLock::new();
    ROUTER.get_or_init(|| {
        let src = FileSource::parse(Path::new("endpoints.yaml"), ENDPOINTS_FILE.as_bytes(), None)
            .expect("the seed file parses");
        let router = Router::default();
        src.apply(&router, None);
        router
    })
}
