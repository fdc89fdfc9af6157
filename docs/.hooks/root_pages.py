"""MkDocs hook: the repository's root documents (REPRODUCTION.md, BENCHMARKS.md, CHANGELOG.md) become pages of
the site, with their links rewritten for it; the files themselves stay where GitHub readers find them."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT_PAGES = {"REPRODUCTION.md": "reproduction.md", "BENCHMARKS.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}
LINKS = {"](docs/images/": "](images/", "](docs/": "](", "](README.md": "](index.md",
         **{f"]({source}": f"]({page}" for source, page in ROOT_PAGES.items()}}


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).parent
    for source, page in ROOT_PAGES.items():
        text = (root / source).read_text(encoding="utf-8")
        for old, new in LINKS.items():
            text = text.replace(old, new)
        files.append(File.generated(config, page, content=text))
    return files
