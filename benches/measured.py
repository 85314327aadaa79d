"""Writes a benchmark's figures where the docs include them.

Every bench script ends by calling `write(name, title, command, how, body)`:
the Markdown goes to `docs/measurements/<name>.md` (and a copy to
`bench-data/<name>.md`), headed by what made it — the command, the date,
the commit and the machine — so that no figure in the docs is typed by
hand. `docs/benchmarks.md` includes each file between
`<!-- measured: measurements/<name>.md -->` and `<!-- end measured -->`;
`tests/it/docs.rs` fails when an included copy differs from its file, and
`GPDP_DOCS=complete cargo test --test it -- docs::` copies the files in.
"""
import datetime
import os
import platform
import subprocess


def machine():
    """Cores, CPU model and memory of this machine, in a few words."""
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    cpu = f" ({model})" if model else ""
    return f"{os.cpu_count()} cores{cpu}{mem}, {platform.system()} {platform.machine()}"


def commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(name, title, command, how, body):
    """`body`: the Markdown lines under the header. Returns the path written."""
    now = datetime.datetime.now(datetime.timezone.utc)
    md = [f"# {title}", "",
          f"Written by `{command}` on {now:%Y-%m-%d %H:%M} UTC at commit {commit()}, {machine()}; {how}.", ""]
    md += body
    text = "\n".join(md).rstrip("\n") + "\n"
    os.makedirs("bench-data", exist_ok=True)
    open(f"bench-data/{name}.md", "w").write(text)
    os.makedirs("docs/measurements", exist_ok=True)
    path = f"docs/measurements/{name}.md"
    open(path, "w").write(text)
    print(f"\nwrote {path} (and bench-data/{name}.md)")
    return path
