//! `docs/SPEC.md` keeps the shared contract verbatim (§1–§11 and §13 on)
//! with our own decisions in §12 between them.
mod support;

/// Splits a spec into (before `## 12.`/`## 13.`, from `## 13.` on).
fn shared_parts(text: &str) -> (String, String) {
    let at13 = text.find("\n## 13.").map_or(text.len(), |i| i + 1);
    let head = text[..at13].split("\n## 12.").next().unwrap_or_default();
    // The separator rule before a section belongs to that section.
    let head = head.trim_end().trim_end_matches('-').trim_end().to_owned();
    (head, text[at13..].to_owned())
}

#[test]
fn docs_spec_keeps_the_shared_contract_verbatim() {
    let shared_path = support::root().join("../shared/SPEC.md");
    let Ok(shared) = std::fs::read_to_string(&shared_path) else {
        eprintln!("../shared/SPEC.md is not beside the checkout; nothing to compare");
        return;
    };
    let ours = std::fs::read_to_string(support::root().join("docs/SPEC.md")).expect("docs/SPEC.md");
    let (shared_head, shared_tail) = shared_parts(&shared);
    let (our_head, our_tail) = shared_parts(&ours);
    assert!(
        ours.contains("\n## 12. Project decisions"),
        "docs/SPEC.md lost §12"
    );
    assert_eq!(
        our_head, shared_head,
        "docs/SPEC.md §1–§11 differ from ../shared/SPEC.md"
    );
    assert_eq!(
        our_tail, shared_tail,
        "docs/SPEC.md §13 on differ from ../shared/SPEC.md"
    );
}
