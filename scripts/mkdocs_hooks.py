"""mkdocs hook: the site's home page is the README, its links to docs/ pages made relative to docs/."""
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri == "index.md":
        return README.read_text().replace("](docs/", "](")
    return markdown
