//! Line numbers for the byte spans that TOML parsers report (`toml::Spanned`, `toml_edit`).

/// The 1-based line holding byte `offset` of `text`; offsets past the end fall on the last line.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    // Bytes, not `&text[..offset]`: an offset inside a multi-byte character must not panic.
    let before = &text.as_bytes()[..offset.min(text.len())];
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::line_of;

    #[test]
    fn lines_count_from_one_and_clamp_to_the_end() {
        let text = "a = 1\nb = \"é\"\n";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 5), 1);
        assert_eq!(line_of(text, 6), 2);
        assert_eq!(line_of(text, 12), 2); // inside the é
        assert_eq!(line_of(text, text.len()), 3);
        assert_eq!(line_of(text, 1000), 3);
    }
}
