#!/usr/bin/env bash
# Fails on a broken link in the built book (docs/book/, from `mdbook build docs`) or in README.md:
# a relative link to a file that does not exist, or to an anchor (#...) that no heading of the
# target page has. mdbook itself only refuses missing pages (create-missing = false); links
# inside pages and into the repository (../../examples/...) would rot silently without this.
# External links (http:, https:, mailto:) are not followed: CI has no network for them.
#   docs/check-links.sh          after `mdbook build docs`
set -euo pipefail
cd "$(dirname "$0")/.."
book=docs/book
[ -d "$book" ] || { echo "docs/check-links.sh: $book is missing: run mdbook build docs first" >&2; exit 1; }

bad=0
report() { echo "docs/check-links.sh: $1: broken link $2" >&2; bad=1; }

# has_id FILE ID: does FILE (HTML) carry id="ID"?
has_id() { grep -qF "id=\"$2\"" "$1"; }

# check FROM_FILE DIR LINK [HTML_FOR_MD]: resolve LINK relative to DIR.
check() {
  local from="$1" dir="$2" link="$3" path frag target
  case "$link" in
    http:* | https:* | mailto:* | javascript:* | "") return 0 ;;
  esac
  path="${link%%#*}"
  frag=""
  [ "$path" != "$link" ] && frag="${link#*#}"
  if [ -z "$path" ]; then target="$from"; else target="$dir/$path"; fi
  target="$(realpath -m "$target")"
  if [ ! -e "$target" ]; then
    report "$from" "$link"
    return 0
  fi
  [ -n "$frag" ] || return 0
  # An anchor into a book page: README links name the source (.md), the book names the .html.
  case "$target" in
    */docs/src/*.md) target="$(realpath -m "$book/${target#*/docs/src/}")"; target="${target%.md}.html" ;;
  esac
  case "$target" in
    *.html) has_id "$target" "$frag" || report "$from" "$link" ;;
  esac
}

# The book's pages. print.html repeats every page; toc.html and 404.html are mdbook's own.
while IFS= read -r -d '' page; do
  case "$(basename "$page")" in print.html | toc.html | 404.html) continue ;; esac
  while IFS= read -r href; do
    href="${href#href=\"}"
    href="${href%\"}"
    check "$page" "$(dirname "$page")" "$href"
  done < <(grep -oE 'href="[^"]*"' "$page" | sed 's/&amp;/\&/g')
done < <(find "$book" -name '*.html' -print0)

# README.md: markdown links [text](target), not images or code.
while IFS= read -r link; do
  link="${link#](}"
  link="${link%)}"
  check README.md . "$link"
done < <(grep -v '^    ' README.md | grep -oE '\]\([^) ]+\)')

[ "$bad" -eq 0 ] || exit 1
echo "docs/check-links.sh: every link in the book and README.md resolves"
