//! Test helper: a small XML well-formedness check of the figures (balanced tags, quoted
//! attributes, valid entities, one `svg` root) and the texts they show.

#![allow(clippy::unwrap_used, clippy::panic)]

/// Panics, naming the place, unless `svg` is a well-formed XML document with an `svg` root.
pub fn assert_well_formed(svg: &str) {
    let mut open: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = svg;
    while let Some(lt) = rest.find('<') {
        check_text(&rest[..lt]);
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<?") {
            let end = after.find("?>").expect("unterminated declaration");
            rest = &after[end + 2..];
            continue;
        }
        if let Some(after) = rest.strip_prefix("<!--") {
            let end = after.find("-->").expect("unterminated comment");
            rest = &after[end + 3..];
            continue;
        }
        let end = tag_end(rest);
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let expected = open
                .pop()
                .unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(name.trim(), expected, "</{name}> closes <{expected}>");
            continue;
        }
        let (tag, empty) = match tag.strip_suffix('/') {
            Some(tag) => (tag, true),
            None => (tag, false),
        };
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        let name = &tag[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_alphanumeric() || "-_:".contains(c)),
            "bad tag name in <{tag}>"
        );
        check_attributes(&tag[name_end..]);
        if open.is_empty() {
            roots += 1;
            assert_eq!(name, "svg", "the root is <{name}>");
        }
        if !empty {
            open.push(name);
        }
    }
    check_text(rest);
    assert!(open.is_empty(), "unclosed: {open:?}");
    assert_eq!(roots, 1, "one root element");
}

/// Where the tag starting at `text[0]` ends (its `>`), skipping quoted attribute values.
fn tag_end(text: &str) -> usize {
    let mut quote = None;
    for (index, c) in text.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return index,
            (None, '<') if index > 0 => panic!("'<' inside a tag: {text:.60}"),
            _ => {}
        }
    }
    panic!("unterminated tag: {text:.60}")
}

fn check_attributes(mut attributes: &str) {
    loop {
        attributes = attributes.trim_start();
        if attributes.is_empty() {
            return;
        }
        let eq = attributes
            .find('=')
            .unwrap_or_else(|| panic!("attribute without a value: {attributes}"));
        let name = attributes[..eq].trim();
        assert!(
            !name.is_empty() && !name.contains(char::is_whitespace),
            "bad attribute name {name:?}"
        );
        let value = attributes[eq + 1..].trim_start();
        let quote = value.chars().next().expect("attribute without a value");
        assert!(quote == '"' || quote == '\'', "unquoted attribute {name}");
        let close = value[1..]
            .find(quote)
            .unwrap_or_else(|| panic!("unterminated attribute {name}"));
        check_text(&value[1..=close]);
        attributes = &value[close + 2..];
    }
}

/// Character data: every `&` starts an entity XML knows.
fn check_text(text: &str) {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        rest = &rest[amp + 1..];
        let semi = rest.find(';').expect("'&' without ';'");
        let entity = &rest[..semi];
        let known = matches!(entity, "lt" | "gt" | "amp" | "quot" | "apos")
            || entity
                .strip_prefix('#')
                .is_some_and(|n| n.parse::<u32>().is_ok() || n.starts_with('x'));
        assert!(known, "unknown entity &{entity};");
        rest = &rest[semi + 1..];
    }
}

/// The contents of every `<text>` element, trimmed, with the entities plotters writes
/// decoded.
pub fn texts(svg: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find("<text") {
        rest = &rest[start..];
        let open_end = tag_end(rest);
        let close = rest.find("</text>").expect("unclosed <text>");
        let text = rest[open_end + 1..close]
            .trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&");
        found.push(text);
        rest = &rest[close..];
    }
    found
}

#[test]
fn the_check_catches_what_it_should() {
    assert_well_formed(
        r#"<?xml version="1.0"?><svg a="1"><g><text x='2'>a &amp; b</text></g><rect/></svg>"#,
    );
    for bad in [
        "<svg><g></svg>",
        "<svg></svg><svg></svg>",
        r#"<svg a=1></svg>"#,
        "<svg>a & b</svg>",
        "<svg><g></g>",
        "<html></html>",
    ] {
        assert!(
            std::panic::catch_unwind(|| assert_well_formed(bad)).is_err(),
            "{bad}"
        );
    }
    assert_eq!(
        texts("<svg><text x=\"1\">\n a &lt; b \n</text></svg>"),
        ["a < b"]
    );
}
