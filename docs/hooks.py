"""MkDocs hook: the figures of ``benchmarks/RESULTS.md`` in the site.

``docs/reproduction.md`` includes ``benchmarks/RESULTS.md`` (pymdownx.snippets), whose images are
written as ``figures/NAME.png`` relative to the benchmarks folder. This hook adds every
``benchmarks/figures/*.png`` to the site as ``figures/NAME.png``, so those links resolve from the
reproduction page (a page at the top of ``docs/``) and the figures live in one place only.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

FIGURES = Path(__file__).resolve().parent.parent / "benchmarks" / "figures"


def on_files(files: Files, config) -> Files:
    for figure in sorted(FIGURES.glob("*.png")):
        files.append(
            File(
                f"figures/{figure.name}",
                src_dir=str(FIGURES.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
