//! The matcher on hand-written grammars: what it accepts, the errors of bad grammars, UTF-8 split
//! over tokens, and the vocabulary mask against token-by-token checks.

use std::sync::Arc;

use kosmos_grammar::{Constraint, Grammar, GrammarError, Json, Matcher, TokenTrie, gbnf};

fn compile(text: &str) -> Arc<Grammar> {
    Constraint::Grammar(text.into())
        .compile()
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn matches(g: &Arc<Grammar>, s: &str) -> bool {
    Constraint::matches(g, s)
}

#[test]
fn json_object_grammar_accepts_json_objects_only() {
    let g = Constraint::JsonObject.compile().unwrap();
    for ok in [
        "{}",
        r#"{"a":1}"#,
        "{ \"a\": [1, -2.5e3, true, null, {\"b\": \"\\u00e9\\n\"}], \"c\": \"中\"}",
        r#"{"":0}"#,
    ] {
        assert!(matches(&g, ok), "{ok}");
    }
    for bad in [
        "",
        "[]",
        "{",
        r#"{"a"}"#,
        r#"{"a":01}"#,
        r#"{"a":1,}"#,
        "{\"a\":\"\u{1}\"}",
        r#"{"a":"\x"}"#,
        "{}}",
        r#"{"a":.5}"#,
        "{\n}",
        "{  }",
    ] {
        assert!(!matches(&g, bad), "{bad}");
    }
}

#[test]
fn bad_grammars_are_named_errors() {
    let e = |t: &str| Constraint::Grammar(t.into()).compile().unwrap_err();
    assert_eq!(e("root ::= a"), GrammarError::UndefinedRule("a".into()));
    assert_eq!(e("a ::= \"x\""), GrammarError::NoRoot);
    assert_eq!(
        e("root ::= \"x\"\nroot ::= \"y\""),
        GrammarError::DuplicateRule("root".into())
    );
    assert!(matches!(
        e("root ::= root \"x\" | \"y\""),
        GrammarError::LeftRecursion(_)
    ));
    // Left recursion through a rule that matches the empty string.
    assert!(matches!(
        e("root ::= e root \"x\" | \"y\"\ne ::= \"\" | \"z\""),
        GrammarError::LeftRecursion(_)
    ));
    assert!(matches!(e("root ::= \"x\" root"), GrammarError::Unproductive(_)));
    assert!(matches!(
        e("root ::= \"x\"{200000}"),
        GrammarError::TooManyRepeats(_)
    ));
    // Repetitions are unrolled into rules: many large ones together pass the size limit.
    let many = (0..25)
        .map(|i| format!("a{i} ::= \"x\"{{0,90000}}\n"))
        .collect::<String>();
    let refs = (0..25).map(|i| format!("a{i}")).collect::<Vec<_>>().join(" ");
    assert!(matches!(
        e(&format!("root ::= {refs}\n{many}")),
        GrammarError::TooLarge(_)
    ));
    // Deep nesting is an error, not a stack overflow (a server thread parses clients' grammars).
    let deep = format!("root ::= {}\"x\"{}", "(".repeat(100_000), ")".repeat(100_000));
    assert!(e(&deep).to_string().contains("nested deeper than 256"));
    let deep = format!("{}a{}", "(".repeat(100_000), ")".repeat(100_000));
    let err = Constraint::Regex(deep).compile().unwrap_err().to_string();
    assert!(err.contains("nested deeper than 256"), "{err}");
    let ok = format!("root ::= {}\"x\"{}", "(".repeat(200), ")".repeat(200));
    assert!(Constraint::Grammar(ok).compile().is_ok());
}

/// Rules chained in the worst order for a pass-by-pass fixpoint (each defined before the rule it
/// needs): productive and nullable are still found, and fast.
#[test]
fn long_rule_chains() {
    let n = 3000;
    let mut text = String::from("root ::= a0\n");
    for i in 0..n {
        text.push_str(&format!("a{i} ::= a{} \"x\"\n", i + 1));
    }
    text.push_str(&format!("a{n} ::= \"y\""));
    let g = compile(&text);
    assert!(matches(&g, &format!("y{}", "x".repeat(n))));
    assert!(!matches(&g, &format!("y{}", "x".repeat(n - 1))));
    let mut text = String::from("root ::= b0 \"z\"\n");
    for i in 0..n {
        text.push_str(&format!("b{i} ::= b{}\n", i + 1));
    }
    text.push_str(&format!("b{n} ::= \"\" | \"q\""));
    let g = compile(&text);
    assert!(matches(&g, "z") && matches(&g, "qz") && !matches(&g, "qqz"));
}

#[test]
fn repetition_counts_and_alternatives() {
    let g = compile("root ::= (\"ab\" | [0-9]){2,3} x?\nx ::= \"!\"+");
    for (s, ok) in [
        ("ab1", true),
        ("abab", true),
        ("1ab2", true),
        ("1", false),
        ("1234", false),
        ("12!!!", true),
        ("12!a", false),
    ] {
        assert_eq!(matches(&g, s), ok, "{s}");
    }
    // Deep right recursion (a long repetition) keeps the stacks flat.
    let g = compile("root ::= \"a\"*");
    let mut m = Matcher::new(g);
    assert!(m.accept(&vec![b'a'; 50_000]) && m.is_accepting());
}

/// An ambiguous grammar (words of optional separators: every split of a run of letters is a
/// parse) is followed up to the limit, then refused with the reason, not run at any cost.
#[test]
fn ambiguity_is_bounded() {
    let g = compile("root ::= ([a-z]{0,60} \" \"?){0,400}");
    let mut m = Matcher::new(g);
    assert!(m.accept(b"ab ab"));
    let mut fed = 0;
    while fed < 400 && m.accept(b"a") {
        fed += 1;
    }
    assert!(fed < 400 && m.overflowed(), "fed {fed}");
    // A long JSON text stays at a handful of parses.
    let g = Constraint::JsonObject.compile().unwrap();
    let mut m = Matcher::new(g);
    let text = format!(
        "{{\"a\": [{}]}}",
        vec!["{\"b\": [1, 2.5, \"x\"]}"; 200].join(", ")
    );
    assert!(m.accept(text.as_bytes()) && m.is_finished() && !m.overflowed());
}

#[test]
fn utf8_split_over_tokens() {
    let g = compile("root ::= \"é\" [a-z] | \"中\"");
    let mut m = Matcher::new(g.clone());
    // é = C3 A9, 中 = E4 B8 AD
    assert!(m.accept(&[0xC3]) && !m.is_accepting());
    assert!(!m.allows(&[0xAA]), "another continuation byte makes ê");
    assert!(m.accept(&[0xA9]) && !m.is_accepting());
    assert!(m.accept(b"z") && m.is_finished());
    let mut m = Matcher::new(g);
    assert!(!m.allows(&[0xE5]), "no allowed character starts with E5");
    assert!(!m.allows(&[0xFF]) && !m.allows(&[0xC0, 0x80]), "invalid UTF-8");
    assert!(m.allows(&[0xE4, 0xB8]) && !m.allows(&[0xE4, 0xB9]));
    assert!(m.accept(&[0xE4, 0xB8, 0xAD]) && m.is_finished());
}

#[test]
fn the_mask_equals_checking_every_token() {
    let pieces: Vec<Vec<u8>> = [
        "{", "}", "\"", "\"a", "a", "ab", "b\"", " ", "\n", ":", ",", "1", "12", "-", "true", "tr", "ue",
        "null", "é", "\"é\"", "[", "]", "{\"", "\":", "0", "00", "", "x",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([vec![0xC3], vec![0xA9], vec![0xFF], vec![0xE4, 0xB8]])
    .collect();
    let trie = TokenTrie::new(pieces.iter().enumerate().map(|(i, p)| (i as u32, p.clone())));
    let schema = Json::parse(
        r#"{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}},"required":["b"]}"#,
    )
    .unwrap();
    for c in [Constraint::JsonObject, Constraint::JsonSchema(schema)] {
        let g = c.compile().unwrap();
        let mut m = Matcher::new(g);
        // Walk a valid text token by token, comparing the mask with one check per token.
        for step in [
            "{", "\"a", "\":", " ", "\"", "é", "\"", ",", "\"", "b", "\":", "12", "}",
        ] {
            let mut mask = vec![false; pieces.len()];
            m.fill_allowed(&trie, &mut mask);
            for (i, p) in pieces.iter().enumerate() {
                assert_eq!(
                    mask[i],
                    m.allows(p),
                    "{c:?} before {step:?}: token {:?}",
                    String::from_utf8_lossy(p)
                );
            }
            assert!(m.accept(step.as_bytes()), "{c:?} {step}");
        }
        assert!(m.is_finished());
    }
}

/// Masks come from the matcher's cache when a state recurs (every character of a string): they
/// equal the mask of a fresh matcher fed the same text, at every step.
#[test]
fn cached_masks_equal_fresh_ones() {
    let pieces: Vec<&str> = vec![
        "\"", "a", "ab", " ", "\\", "\\n", "\"}", "}", ",", ":", "{", "\"k\"", "1", "é", "x\"", "",
    ];
    let trie = TokenTrie::new(pieces.iter().enumerate().map(|(i, p)| (i as u32, p.as_bytes())));
    let g = Constraint::JsonObject.compile().unwrap();
    let text = r#"{"k": "aaaa ab aaaa \n aaaaaaaa", "kk": {"a": "ababab"}, "z": 11}"#;
    let mut cached = Matcher::new(g.clone());
    for (i, c) in text.char_indices() {
        let mut a = vec![false; pieces.len()];
        cached.fill_allowed(&trie, &mut a);
        let mut fresh = Matcher::new(g.clone());
        assert!(fresh.accept(&text.as_bytes()[..i]));
        let mut b = vec![false; pieces.len()];
        fresh.fill_allowed(&trie, &mut b);
        assert_eq!(a, b, "after {:?}", &text[..i]);
        let mut buf = [0u8; 4];
        assert!(cached.accept(c.encode_utf8(&mut buf).as_bytes()));
    }
    assert!(cached.is_finished());
}

#[test]
fn integer_bounds_match_arithmetic() {
    let bounds = [
        (Some(0), Some(5)),
        (Some(1), Some(10)),
        (Some(-7), Some(7)),
        (Some(-120), Some(-13)),
        (Some(13), Some(987)),
        (Some(99), Some(100)),
        (Some(150), None),
        (None, Some(-42)),
        (None, Some(205)),
        (Some(-5), None),
        (Some(0), Some(0)),
    ];
    for (lo, hi) in bounds {
        let mut s = vec![r#""type":"integer""#.to_string()];
        if let Some(l) = lo {
            s.push(format!(r#""minimum":{l}"#));
        }
        if let Some(h) = hi {
            s.push(format!(r#""maximum":{h}"#));
        }
        let schema = Json::parse(&format!("{{{}}}", s.join(","))).unwrap();
        let g = Constraint::JsonSchema(schema).compile().unwrap();
        for v in -1100i64..=1100 {
            let want = lo.is_none_or(|l| v >= l) && hi.is_none_or(|h| v <= h);
            assert_eq!(matches(&g, &v.to_string()), want, "{v} in [{lo:?}, {hi:?}]");
        }
        for v in ["-0", "007", "1e2", "12345678901234567"] {
            assert!(!matches(&g, v), "{v}");
        }
    }
    // Exclusive bounds and a non-integer bound.
    let g = Constraint::JsonSchema(
        Json::parse(r#"{"type":"integer","exclusiveMinimum":2,"maximum":7.5}"#).unwrap(),
    )
    .compile()
    .unwrap();
    let ok: Vec<i64> = (-10..20).filter(|v| matches(&g, &v.to_string())).collect();
    assert_eq!(ok, [3, 4, 5, 6, 7]);
}

#[test]
fn unsupported_schema_keywords_are_named() {
    for (schema, says) in [
        (
            r#"{"type":"array","uniqueItems":true}"#,
            "keyword 'uniqueItems' is not supported",
        ),
        (
            r#"{"type":"object","properties":{"a":{"type":"number","multipleOf":2}}}"#,
            "#/properties/a: keyword 'multipleOf'",
        ),
        (
            r#"{"type":"number","minimum":2,"exclusiveMaximum":2}"#,
            "no number lies between 2 and 2",
        ),
        (r#"{"type":"number","exclusiveMinimum":true}"#, "draft 6"),
        (
            r#"{"$ref":"https://example.com/s.json"}"#,
            "only local references",
        ),
        (r#"{"type":"object","required":["x"]}"#, "required property 'x'"),
        (r#"{"type":"string","pattern":"(a)\\1"}"#, "backreference"),
        (r#"{"type":"strin"}"#, "unknown type 'strin'"),
        (r#"{"enum":[]}"#, "empty enum"),
    ] {
        let e = Constraint::JsonSchema(Json::parse(schema).unwrap())
            .compile()
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{schema}: {e}");
    }
}

#[test]
fn recursive_references() {
    let schema = Json::parse(
        r##"{"$ref":"#/$defs/node","$defs":{"node":{"type":"object","properties":{"v":{"type":"integer"},"kids":{"type":"array","items":{"$ref":"#/$defs/node"}}},"required":["v"]}}}"##,
    )
    .unwrap();
    let g = Constraint::JsonSchema(schema).compile().unwrap();
    assert!(matches(&g, r#"{"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]}"#));
    assert!(!matches(&g, r#"{"v":1,"kids":[{"kids":[]}]}"#));
}

#[test]
fn printed_gbnf_parses_back_to_the_same_language() {
    let schema = Json::parse(r#"{"type":"object","properties":{"name":{"type":"string","maxLength":3},"tags":{"type":"array","items":{"enum":["a","b\"c"]},"minItems":1,"maxItems":2}},"required":["tags"]}"#).unwrap();
    let text = Constraint::JsonSchema(schema).to_gbnf().unwrap();
    let g = Arc::new(Grammar::compile(&gbnf::parse(&text).unwrap()).unwrap());
    assert!(matches(&g, r#"{"name":"abc","tags":["a","b\"c"]}"#), "{text}");
    assert!(matches(&g, r#"{"tags":["a"]}"#));
    assert!(!matches(&g, r#"{"name":"abcd","tags":["a"]}"#));
    assert!(!matches(&g, r#"{"tags":[]}"#));
    assert!(!matches(&g, r#"{"tags":["a","a","a"]}"#));
}

/// Exact decimal comparison, written independently of the grammar: (negative, digits scaled to
/// 20 fraction digits) of a plain decimal text.
fn scaled(text: &str) -> Option<(bool, i128)> {
    let (neg, body) = text.strip_prefix('-').map_or((false, text), |b| (true, b));
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() || frac.len() > 20 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: i128 = format!("{int}{frac:0<20}").parse().ok()?;
    Some((neg, if neg { -v } else { v }))
}

#[test]
fn number_bounds_match_exact_decimal_comparison() {
    let bounds: &[(&str, &str)] = &[
        (r#""minimum":0,"maximum":1"#, "[0, 1]"),
        (r#""exclusiveMinimum":0,"exclusiveMaximum":1"#, "(0, 1)"),
        (r#""minimum":0.25,"maximum":2.5"#, "[0.25, 2.5]"),
        (r#""minimum":-1.5,"exclusiveMaximum":0.1"#, "[-1.5, 0.1)"),
        (r#""exclusiveMinimum":-2.05,"maximum":-0.001"#, "(-2.05, -0.001]"),
        (r#""minimum":0.1"#, "[0.1, inf)"),
        (r#""exclusiveMaximum":-0.5"#, "(-inf, -0.5)"),
        (r#""minimum":1.05,"maximum":1.0502"#, "[1.05, 1.0502]"),
        (r#""minimum":3,"maximum":3"#, "[3, 3]"),
    ];
    let ints = ["0", "1", "2", "3", "10", "123"];
    let fracs = [
        "",
        "0",
        "00",
        "05",
        "0502",
        "0503",
        "05019",
        "1",
        "10",
        "100000000000001",
        "0000000000000001",
        "00000000000000001",
        "09",
        "25",
        "2499",
        "2501",
        "5",
        "49999",
        "99",
        "999999999999999",
    ];
    let mut texts = Vec::new();
    for neg in ["", "-"] {
        for i in ints {
            for f in fracs {
                texts.push(if f.is_empty() {
                    format!("{neg}{i}")
                } else {
                    format!("{neg}{i}.{f}")
                });
            }
        }
    }
    let parse = |s: &str| scaled(s).expect("a bound").1;
    for (schema, what) in bounds {
        let g = Constraint::JsonSchema(Json::parse(&format!(r#"{{"type":"number",{schema}}}"#)).unwrap())
            .compile()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let field = |k: &str| {
            schema
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("\"{k}\":")).map(|v| v.to_string()))
        };
        let lo = field("minimum")
            .map(|v| (parse(&v), true))
            .or(field("exclusiveMinimum").map(|v| (parse(&v), false)));
        let hi = field("maximum")
            .map(|v| (parse(&v), true))
            .or(field("exclusiveMaximum").map(|v| (parse(&v), false)));
        let mut inside = 0;
        for t in &texts {
            let (_, v) = scaled(t).unwrap();
            let fraction_digits = t.split_once('.').map_or(0, |(_, f)| f.len());
            let want = lo.is_none_or(|(l, incl)| if incl { v >= l } else { v > l })
                && hi.is_none_or(|(h, incl)| if incl { v <= h } else { v < h })
                && fraction_digits <= 16;
            inside += usize::from(want);
            assert_eq!(matches(&g, t), want, "{t} in {what}");
        }
        assert!(inside > 0, "{what}: some candidates lie inside");
        for t in ["1e0", "0.5e1", ".5", "01.5", "1.", "+1"] {
            assert!(!matches(&g, t), "{t} in {what}");
        }
    }
}

/// Characters the brute-force check below tries.
fn alphabet() -> Vec<char> {
    (' '..='~').chain(['é', '中', '\n', '\t']).collect()
}

/// `Matcher::forced` against trying every character: each forced character is the only one the
/// grammar allows there, and after the forced text either several are allowed, the text may end,
/// or the limit was reached.
#[test]
fn forced_text_is_the_only_continuation() {
    let schema = Json::parse(
        r#"{"type":"object","properties":{"colour":{"enum":["crimson","cyan"]},"count":{"type":"integer"}},"required":["colour","count"]}"#,
    )
    .unwrap();
    let cases: Vec<(Arc<Grammar>, &str, &str)> = vec![
        (compile(r#"root ::= "abc" | "abd""#), "", "ab"),
        (compile(r#"root ::= "h" [é] "llo" [0-9]"#), "", "héllo"),
        (compile(r#"root ::= "x" "y"?"#), "x", ""),
        (Constraint::JsonSchema(schema.clone()).compile().unwrap(), "{", ""),
        (
            Constraint::JsonSchema(schema.clone()).compile().unwrap(),
            "{\"",
            "colour\"",
        ),
        (
            Constraint::JsonSchema(schema.clone()).compile().unwrap(),
            r#"{"colour": "c"#,
            "",
        ),
        (
            Constraint::JsonSchema(schema).compile().unwrap(),
            r#"{"colour": "cr"#,
            "imson\"",
        ),
    ];
    for (g, before, want) in cases {
        let mut m = Matcher::new(g.clone());
        assert!(m.accept(before.as_bytes()), "{before:?}");
        let forced = m.forced(64);
        assert_eq!(forced, want, "after {before:?}");
        // Brute force, independent of `forced`: one character allowed at each step, then not.
        let mut text = before.to_string();
        for c in forced.chars() {
            let allowed: Vec<char> = alphabet()
                .into_iter()
                .filter(|a| m.allows(a.to_string().as_bytes()))
                .collect();
            assert_eq!(allowed, vec![c], "after {text:?}");
            assert!(!m.is_accepting(), "after {text:?}: the text could end");
            assert!(m.accept(c.to_string().as_bytes()));
            text.push(c);
        }
        let allowed = alphabet()
            .into_iter()
            .filter(|a| m.allows(a.to_string().as_bytes()))
            .count();
        assert!(
            allowed != 1 || m.is_accepting(),
            "after {text:?}: one character was left"
        );
    }
    // The limit, and a matcher unchanged by asking.
    let g = compile(r#"root ::= "abcdef" [0-9]"#);
    let mut m = Matcher::new(g);
    assert_eq!(m.forced(4), "abcd");
    assert_eq!(m.forced(64), "abcdef");
    assert!(m.accept(b"abcdef7") && m.is_accepting());
}

/// Restoring a snapshot undoes what was accepted since: the same text is allowed, accepted and
/// forced as before, and the matcher goes on as if the detour never happened.
#[test]
fn a_snapshot_restores_the_place_in_the_text() {
    let g = compile(r#"root ::= "{\"name\": \"" [a-z]+ "\"}" | "[" [0-9]+ "]""#);
    let mut m = Matcher::new(g.clone());
    assert!(m.accept(b"{\"na"));
    let at = m.snapshot();
    let forced = m.forced(64);
    assert_eq!(forced, "me\": \"");
    assert!(m.accept(b"me\": \"abc\"}"));
    assert!(m.is_finished());
    m.restore(at);
    assert!(!m.is_accepting());
    assert_eq!(m.forced(64), forced);
    assert!(!m.allows(b"["));
    assert!(m.accept(b"me\": \"xyz"));
    assert!(!m.allows(b"1"));
    assert!(m.accept(b"\"}"));
    assert!(m.is_finished());
    assert!(matches(&g, "{\"name\": \"xyz\"}"));
}
