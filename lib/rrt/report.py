"""`make report`: render every executed notebook under outputs/ to HTML and write outputs/index.html.

The index has one row per notebook run (outputs/<notebook>/<scale>-<time>/, outputs/examples/…), ordered
by notebook then newest first: its scale, date, commit, status (a failed run names its failing cell) and
figures; directories of results without an executed notebook (committed examples) get a row too. A notebook
that is not valid JSON (the disk filled while papermill wrote it) gets a row naming it and is not rendered.
`--screenshots [DIR]` also writes full-page PNGs of the index and of every page (headless Chromium), by default
into root/screenshots/<time>/.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rrt.rundir import replacing, write_text

RESULT_FILES = ("*.csv", "*.md", "*.txt", "*.png")
# Under root: @jupyter-widgets/html-manager's embed-amd.js and require.js (`make report` fetches them with npm).
# nbconvert's pages load both from a CDN, so without them widgets (00_explore's controls) render empty offline.
WIDGET_JS = ".widgets"
# Wide tables: headers wrap, and a table still wider than the page scrolls inside its output, never past the page's
# edge (nbconvert's lab template lets it overflow: the screenshots cut it off).
WIDE_TABLES_CSS = ("<style>.jp-OutputArea-output{overflow-x:auto;max-width:100%}"
                   ".jp-RenderedHTMLCommon table{table-layout:auto}"
                   ".jp-RenderedHTMLCommon thead th{white-space:normal;max-width:9em;vertical-align:bottom}"
                   ".jp-RenderedImage img{max-width:100%;height:auto}</style>")


@dataclass(frozen=True)
class Entry:
    """One row of the index: a notebook run (`notebook` set) or a directory of results only."""
    name: str             # the notebook ("01_init_ablation"), or the results directory relative to root
    dir: Path             # the run directory
    notebook: Path | None
    scale: str
    date: datetime        # when papermill finished the notebook, else the run directory's stamp, else its newest file
    commit: str           # versions.json's git_commit, shortened ("-dirty" kept); "?" when absent
    status: str           # "ok", "failed at In [n]: Error: message", "stopped at In [n]", "results only",
                          # "unreadable: <notebook> is not valid JSON (...)"


def write_index(root: Path, found: list[Entry] | None = None) -> Path:
    """Render every readable executed notebook under root and write root/index.html, one row per `entries` entry
    (or per entry of `found`, when the caller has them already)."""
    rows = []
    for e in entries(root) if found is None else found:
        page = None if e.notebook is None or unreadable(e) else render(e.notebook, widget_js=root / WIDGET_JS)
        link = f'<a href="{_rel(page, root)}">{html.escape(e.name)}</a>' if page else html.escape(e.name)
        files = "" if page else " ".join(f'<a href="{_rel(f, root)}">{html.escape(f.name)}</a>'
                                         for f in _result_files(e.dir) if f.suffix != ".png")
        thumbs = "".join(f'<a href="{_rel(f, root)}"><img src="{_rel(f, root)}" height="100"></a> '
                         for f in sorted(e.dir.rglob("*.png")))
        state = "ok" if e.status in ("ok", "results only") else "bad"
        rows.append(f'<tr><td>{link}</td><td>{html.escape(e.scale)}</td>'
                    f'<td class="nowrap">{e.date:%Y-%m-%d %H:%M}</td><td><code>{html.escape(e.commit)}</code></td>'
                    f'<td class="{state}">{html.escape(e.status)}</td>'
                    f'<td><a href="{_rel(e.dir, root)}/">{html.escape(str(_rel(e.dir, root)))}</a> {files}</td>'
                    f'<td>{thumbs}</td></tr>')
    index = write_text(root / "index.html", "<!doctype html><meta charset=utf-8><title>rrt results</title><style>"
                     "body{font-family:sans-serif}td{padding:4px 10px;vertical-align:top}"
                     "tr:nth-child(even){background:#f4f4f4}.bad{color:#b00;font-weight:bold}"
                     ".nowrap{white-space:nowrap}</style>"
                     "<h1>rrt: executed notebooks</h1><table><tr><th>notebook</th><th>scale</th><th>date (UTC)</th>"
                     "<th>commit</th><th>status</th><th>run directory</th><th>figures</th></tr>"
                     + "".join(rows) + "</table>")
    return index


def unreadable(entry: Entry) -> bool:
    """Whether the entry's notebook could not be read (its row names it; it is not rendered)."""
    return entry.notebook is not None and f"{entry.notebook} is not valid JSON" in entry.status


def entries(root: Path) -> list[Entry]:
    """Return the index's rows: every run directory under root, by notebook name, then newest first."""
    found = [describe(nb.parent, nb) for nb in _files(root, "*.ipynb")]
    with_notebook = {e.dir for e in found}
    found += [describe(v.parent, None, root) for v in _files(root, "versions.json") if v.parent not in with_notebook]
    return sorted(sorted(found, key=lambda e: e.date, reverse=True), key=lambda e: e.name)


def describe(run_dir: Path, notebook: Path | None, root: Path | None = None) -> Entry:
    """Return the index row of a run directory (its executed notebook, config.json and versions.json); a file that
    is not valid JSON is named in the row's status, never a crash of the whole report."""
    damaged = []
    config, versions = _read(run_dir / "config.json", damaged), _read(run_dir / "versions.json", damaged)
    nb = _read(notebook, damaged) if notebook else {}
    commit = str(versions.get("git_commit") or "?")
    commit = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "") if len(commit) >= 40 else commit
    papermill = nb.get("metadata", {}).get("papermill", {})
    ended = papermill.get("end_time") or papermill.get("start_time")
    name = notebook.stem if notebook else config.get("notebook") or str(run_dir.relative_to(root))
    state = ("unreadable: " + "; ".join(damaged) if damaged else status(nb) if notebook else "results only")
    return Entry(name=name, dir=run_dir, notebook=notebook,
                 scale=str(papermill.get("parameters", {}).get("scale", config.get("scale", "?"))),
                 date=datetime.fromisoformat(ended) if ended else _stamp(run_dir, config), commit=commit, status=state)


def status(nb: dict) -> str:
    """Return "ok", "failed at In [n]: Error: message" or "stopped at In [n]" (killed, or still running) from
    the cell metadata papermill writes as it executes (`metadata.papermill.status` / `exception` per cell).

    papermill marks a cell running before the kernel numbers it, so a run killed then has no In [n]: the cell is
    named by its place in the notebook instead ("cell 7 of 20 (not yet numbered)")."""
    cells = nb.get("cells", [])
    for place, cell in enumerate(cells, 1):
        meta = cell.get("metadata", {}).get("papermill", {})
        count = cell.get("execution_count")
        where = f"In [{count}]" if count else f"cell {place} of {len(cells)} (not yet numbered)"
        if meta.get("exception") or meta.get("status") == "failed":
            error = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), {})
            message = f"{error.get('ename', 'error')}: {error.get('evalue', '')}".strip(": ")
            return f"failed at {where}: {message[:200]}"
        if meta.get("status") == "running":
            return f"stopped at {where}"
    return "ok"


def render(notebook: Path, *, widget_js: Path | None = None) -> Path:
    """Write notebook.html beside the notebook (nbconvert's lab template, widget state included); return its path.

    widget_js: a directory holding embed-amd.js and require.js, linked instead of the CDN's when present.
    """
    from nbconvert import HTMLExporter

    local = {}
    if widget_js is not None and (widget_js / "embed-amd.js").exists():
        rel = Path(os.path.relpath(widget_js, notebook.parent)).as_posix()
        local = {"widget_renderer_url": f"{rel}/embed-amd.js", "require_js_url": f"{rel}/require.js"}
    body, _ = HTMLExporter(**local).from_filename(str(notebook))
    return write_text(notebook.with_suffix(".html"), body.replace("</head>", WIDE_TABLES_CSS + "</head>", 1))


def screenshots(root: Path, out_dir: Path, *, width: int = 1280, height: int = 16000) -> list[Path]:
    """Write full-page PNGs of root/index.html and of every rendered notebook into out_dir; return their paths.

    Chromium's --screenshot takes the window, not the page: it shoots a `height`-tall window and the blank
    bottom is cropped (a page longer than `height` is cut there).
    """
    chromium = find_chromium()
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = [root / "index.html"] + [e.notebook.with_suffix(".html") for e in entries(root) if e.notebook]
    shots = []
    for page in pages:
        name = "index" if page == root / "index.html" else _rel(page.parent, root).replace("/", "-")
        shot = out_dir / f"{name}.png"
        with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state from an earlier run
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--allow-file-access-from-files", f"--user-data-dir={profile}",
                            "--virtual-time-budget=10000",  # let the widget scripts run before the shot
                            f"--window-size={width},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                           check=True, capture_output=True, timeout=300)
        _crop_blank_bottom(shot)
        shots.append(shot)
    return shots


def find_chromium() -> str:
    """Return the path of a headless-capable Chromium on PATH; raise naming what to install if there is none."""
    found = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
    if found is None:
        raise RuntimeError("no Chromium found (chromium, chromium-browser or google-chrome on PATH); "
                           "on Debian: apt-get install chromium")
    return found


def screenshot_dir(root: Path, when: datetime | None = None) -> Path:
    """Where `make screenshots` writes by default: root/screenshots/<YYYYmmdd-HHMMSS>/, beside the runs, never
    into the committed examples (`make examples` regenerates those)."""
    return root / "screenshots" / f"{when or datetime.now():%Y%m%d-%H%M%S}"


def _crop_blank_bottom(png: Path, margin: int = 24) -> None:
    """Crop the rows below the page's last non-background row (the background: the bottom-left pixel)."""
    from PIL import Image, ImageChops

    image = Image.open(png).convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((0, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box:
        with replacing(png) as tmp:
            image.crop((0, 0, image.width, min(image.height, box[3] + margin))).save(tmp)


def _stamp(run_dir: Path, config: dict) -> datetime:
    """The <scale>-<YYYYmmdd-HHMMSS>[-n] stamp `make run` names a run directory with (local time; a copied example
    keeps it in config.json's run_dir), else the directory's newest file: checkouts and copies reset mtimes."""
    for name in (str(config.get("run_dir", "")), run_dir.name):
        found = re.search(r"(\d{8}-\d{6})(-\d+)?/?$", name)  # -n: a second run started in the same second
        if found:
            return datetime.strptime(found.group(1), "%Y%m%d-%H%M%S").astimezone(timezone.utc)
    return datetime.fromtimestamp(max(f.stat().st_mtime for f in run_dir.iterdir()), timezone.utc)


def _files(root: Path, pattern: str) -> list[Path]:
    # "runs": the run store (each training run's checkpoints and config), not a notebook run
    return [p for p in root.rglob(pattern) if not {".ipynb_checkpoints", "runs"} & set(p.relative_to(root).parts)]


def _result_files(run_dir: Path) -> list[Path]:
    return sorted(f for pattern in RESULT_FILES for f in run_dir.glob(pattern))


def _read(path: Path, damaged: list[str]) -> dict:
    """Return a JSON file's contents ({} if absent); a damaged one gives {} and a line naming it in `damaged`."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as err:
        damaged.append(f"{path} is not valid JSON ({err}); rerun the notebook or move it aside")
        return {}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
