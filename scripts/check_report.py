#!/usr/bin/env python3
"""Check that a report folder renders in headless Chromium: images load, tables and videos are there.

    python3 scripts/check_report.py REPORT_DIR [--screenshot OUT.png] [--no-install]
    python3 scripts/check_report.py --install-only      # CI: just make sure chromium is installed

Standard library only (runs before any virtual environment exists). Installs the
Debian package `chromium` with apt-get when it is missing (needs root), unless
--no-install. Checks, failing (exit 1) with one line per problem:

1. on disk: every src/href in index.html is relative, stays inside the folder
   and names an existing file; manifest.json lists nothing missing;
2. in the browser: a copy of index.html with a small script appended is loaded
   from the same folder (so relative paths resolve the same way); once the page
   has loaded and each <video> has reported metadata or an error, the script
   writes what it found into the DOM, which `--dump-dom` prints. Every <img> must
   have decoded (naturalWidth > 0), every <video> must have metadata (readyState
   >= 1, no error, non-zero width), and each image, video and table the manifest
   lists must be in the page, each table with at least one body row;
3. a screenshot of the real index.html is taken (non-empty PNG).

Exit codes: 0 all good; 1 the report has problems; 2 no browser / bad usage.
"""
from __future__ import annotations

import argparse
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zlib
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--mute-audio", "--allow-file-access-from-files",
]
TIMEOUT_S = 120
RESULT_ID = "report-check-result"

# Appended to a copy of the page. Waits for load, then for each video's metadata
# (or error), then records what every img / video / table looks like.
PROBE = """
<script>
(function () {
  function settle(v) {
    return new Promise(function (resolve) {
      if (v.readyState >= 1 || v.error) { resolve(); return; }
      v.addEventListener('loadedmetadata', resolve, {once: true});
      v.addEventListener('error', resolve, {once: true});
      var s = v.querySelector('source'); if (s) s.addEventListener('error', resolve, {once: true});
      setTimeout(resolve, 20000);
      if (v.preload === 'none') v.load();
    });
  }
  window.addEventListener('load', function () {
    var videos = Array.prototype.slice.call(document.querySelectorAll('video'));
    Promise.all(videos.map(settle)).then(function () {
      var out = {
        images: Array.prototype.map.call(document.images, function (i) {
          return {src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight};
        }),
        videos: videos.map(function (v) {
          var source = v.querySelector('source');
          var s = v.getAttribute('src') || (source ? source.getAttribute('src') : null);
          return {src: s, readyState: v.readyState, error: v.error ? v.error.code : null, width: v.videoWidth,
                  duration: isFinite(v.duration) ? v.duration : null};
        }),
        tables: Array.prototype.map.call(document.querySelectorAll('table'), function (t) {
          return {id: t.id, rows: t.tBodies.length ? t.tBodies[0].rows.length : Math.max(t.rows.length - 1, 0)};
        })
      };
      var pre = document.createElement('pre');
      pre.id = '""" + RESULT_ID + """';
      pre.textContent = JSON.stringify(out);
      document.body.appendChild(pre);
    });
  });
})();
</script>
"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_chromium() -> str | None:
    """apt-get install chromium (Debian); None when that is not possible here."""
    if shutil.which("apt-get") is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    for cmd in (["apt-get", "update", "-qq"], install):
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            print(r.stdout[-2000:], file=sys.stderr)
            return None
    return find_browser()


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "poster") and value is not None:
                self.links.append((tag, value))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def png_problem(path: Path) -> str | None:
    """Why a PNG is not a whole image (None if it is): signature, chunk CRCs, IEND, the full pixel data.

    A browser shows a truncated PNG as far as it goes and reports its full size
    from the header, so a broken file is caught here, byte by byte.
    """
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        return "not a PNG file"
    pos, idat, header, ended = len(_PNG_SIGNATURE), [], None, False
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            return f"truncated in chunk {kind!r}"
        if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
            return f"bad CRC in chunk {kind!r}"
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
        pos += 12 + length
    if header is None or not idat or not ended:
        return "missing IHDR, IDAT or IEND"
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    try:
        pixels = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        return f"pixel data does not decompress ({e})"
    if interlace == 0 and colour in _PNG_CHANNELS:
        expected = height * (1 + (width * _PNG_CHANNELS[colour] * depth + 7) // 8)
        if len(pixels) != expected:
            return f"pixel data holds {len(pixels)} bytes, {width}x{height} needs {expected}"
    return None


def static_problems(root: Path, manifest: dict) -> list[str]:
    problems = []
    index = root / "index.html"
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    for tag, link in parser.links:
        if link.startswith("#"):
            continue
        parts = urlsplit(link)
        if parts.scheme or parts.netloc or link.startswith("/"):
            problems.append(f"<{tag}> link {link!r} is not relative (the report must open from disk anywhere)")
            continue
        target = (root / unquote(parts.path)).resolve()
        if root.resolve() not in target.parents:
            problems.append(f"<{tag}> link {link!r} leaves the report folder")
        elif not target.is_file():
            problems.append(f"<{tag}> link {link!r}: no such file")
        elif target.suffix.lower() == ".png" and (why := png_problem(target)):
            problems.append(f"broken image {link!r}: {why}")
    for what in manifest.get("missing", []):
        problems.append(f"missing from the report: {what}")
    return problems


def run_browser(browser: str, args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="report-check-profile-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)


def browser_problems(browser: str, root: Path, manifest: dict) -> tuple[list[str], dict]:
    """Problems seen in the loaded page, and what the probe found there."""
    index = root / "index.html"
    page = index.read_text(encoding="utf-8")
    probe_page = root / f".check-{uuid.uuid4().hex}.html"
    at = page.rfind("</body>")
    probe_page.write_text(page[:at] + PROBE + page[at:] if at >= 0 else page + PROBE, encoding="utf-8")
    try:
        # Virtual time does not advance while files are still loading, so the budget
        # is reached only after the page (and the probe's waits) have settled.
        r = run_browser(browser, ["--virtual-time-budget=30000", "--dump-dom", probe_page.resolve().as_uri()])
    finally:
        probe_page.unlink(missing_ok=True)
    m = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', r.stdout, re.DOTALL)
    if m is None:
        tail = (r.stderr or "").strip().splitlines()[-5:]
        return [f"the page never finished loading in the browser (exit {r.returncode}); stderr tail: {tail}"], {}
    found = json.loads(html.unescape(m.group(1)))
    problems = []
    for img in found["images"]:
        if not img["complete"] or not img["width"]:
            problems.append(f"broken image {img['src']!r}")
    for v in found["videos"]:
        if v["error"] is not None or v["readyState"] < 1 or not v["width"]:
            problems.append(f"video {v['src']!r} does not play (error {v['error']}, readyState {v['readyState']})")
    srcs = {i["src"] for i in found["images"]}
    vsrcs = {v["src"] for v in found["videos"]}
    for rel in manifest.get("images", []):
        if quote(rel, safe="/") not in srcs and rel not in srcs:
            problems.append(f"image {rel!r} is not in the page")
    for rel in manifest.get("videos", []):
        if quote(rel, safe="/") not in vsrcs and rel not in vsrcs:
            problems.append(f"video {rel!r} is not in the page")
    tables = {t["id"]: t["rows"] for t in found["tables"]}
    for tid in manifest.get("tables", []):
        if tid not in tables:
            problems.append(f"table {tid!r} is not in the page")
        elif tables[tid] < 1:
            problems.append(f"table {tid!r} has no rows")
    if not found["tables"]:
        problems.append("the page has no table")
    return problems, found


def screenshot(browser: str, root: Path, out: Path) -> list[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    r = run_browser(browser, [f"--screenshot={out.resolve()}", "--window-size=1280,2400", "--hide-scrollbars",
                              "--virtual-time-budget=10000", (root / "index.html").resolve().as_uri()])
    if not out.is_file() or out.stat().st_size < 1000:
        return [f"no screenshot written (exit {r.returncode})"]
    return []


def check(root: Path, screenshot_path: Path | None, install: bool) -> tuple[int, dict]:
    browser = find_browser() or (install_chromium() if install else None)
    if browser is None:
        print("error: chromium not found (install the Debian package 'chromium', as root: "
              "apt-get install -y chromium)", file=sys.stderr)
        return 2, {}
    if not (root / "index.html").is_file():
        print(f"error: {root} has no index.html", file=sys.stderr)
        return 2, {}
    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {"tables": []}
    problems = static_problems(root, manifest)
    bp, found = browser_problems(browser, root, manifest)
    problems += bp
    shot = screenshot_path or Path(tempfile.mkdtemp(prefix="report-shot-")) / "report.png"
    problems += screenshot(browser, root, shot)
    summary = {
        "report": str(root), "browser": browser, "screenshot": str(shot), "problems": problems,
        "images": len(found.get("images", [])), "videos": len(found.get("videos", [])),
        "tables": {t["id"]: t["rows"] for t in found.get("tables", [])},
    }
    return (1 if problems else 0), summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", nargs="?", help="the report folder (holding index.html)")
    ap.add_argument("--screenshot", type=Path, help="where to write the screenshot (default: a temp folder)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install chromium when it is missing")
    ap.add_argument("--install-only", action="store_true", help="install chromium if missing, then exit")
    args = ap.parse_args(argv)
    if args.install_only:
        browser = find_browser() or install_chromium()
        print(browser or "chromium could not be installed (needs root and apt-get)")
        return 0 if browser else 2
    if not args.report:
        ap.error("give the report folder")
    code, summary = check(Path(args.report), args.screenshot, install=not args.no_install)
    if summary:
        print(json.dumps(summary, indent=1))
    for p in summary.get("problems", []):
        print(f"FAIL: {p}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
