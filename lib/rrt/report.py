"""`make report`: render every executed notebook under outputs/ to HTML and write outputs/index.html."""
from __future__ import annotations

import argparse
import html
import json
from pathlib import Path


def executed_notebooks(root: Path) -> list[Path]:
    """Return every executed notebook under root (one per run directory), newest first."""
    found = [p for p in root.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and "runs" not in p.parts]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def render(notebook: Path) -> Path:
    """Write notebook.html beside the notebook (nbconvert's lab template); return its path."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(notebook))
    out = notebook.with_suffix(".html")
    out.write_text(body)
    return out


def write_index(root: Path) -> Path:
    """Render every executed notebook and write root/index.html linking each with its figures."""
    rows = []
    for nb in executed_notebooks(root):
        page = render(nb)
        config = nb.parent / "config.json"
        scale = json.loads(config.read_text()).get("scale", "?") if config.exists() else "?"
        figures = sorted((nb.parent / "figures").glob("*.png"))
        thumbs = "".join(f'<a href="{f.relative_to(root)}"><img src="{f.relative_to(root)}" height="160"></a>'
                         for f in figures)
        rows.append(f"<tr><td><a href=\"{page.relative_to(root)}\">{html.escape(nb.stem)}</a></td>"
                    f"<td>{html.escape(scale)}</td><td>{html.escape(str(nb.parent.relative_to(root)))}</td>"
                    f"<td>{thumbs}</td></tr>")
    index = root / "index.html"
    index.write_text("<!doctype html><meta charset=utf-8><title>rrt results</title>"
                     "<style>body{font-family:sans-serif}td{padding:4px 10px;vertical-align:top}</style>"
                     "<h1>rrt: executed notebooks</h1><table><tr><th>notebook</th><th>scale</th><th>run</th>"
                     "<th>figures</th></tr>" + "".join(rows) + "</table>")
    return index


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="outputs")
    args = parser.parse_args(argv)
    print(f"wrote {write_index(Path(args.root))}")


if __name__ == "__main__":
    main()
