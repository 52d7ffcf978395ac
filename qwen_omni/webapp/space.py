"""Build a Hugging Face Space folder: `python -m qwen_omni space DIR [--model ID_OR_PATH] [--hardware FLAVOR]`.

Design
- The folder is self-contained and ready for `hf upload USER/NAME DIR . --repo-type space`: app.py, the library
  (qwen_omni/, encoders/), the example media, a README whose YAML block configures the Space, the runtime
  requirements (never the test stack), packages.txt and a .gitattributes.
- The Hub's push rules shape the folder: a Space refuses a push holding a file over 10 MB that is not stored
  through LFS/Xet (binary files have a lower limit, 1 MB has been reported). `.gitattributes` routes weights,
  audio, video and images through LFS by pattern, and every other file that would break a rule is added to it by
  exact path, so the rule holds by construction. `hf upload` sends large files through Xet on its own; the file
  is for users who push with git.
- The model: none given -> the embedded assets/tiny-omni is copied in; a local directory -> copied to model/;
  a Hub id -> nothing is downloaded here: the YAML's `preload_from_hub` makes the Space's build fetch it into the
  Hub cache (where `load` finds it), and app.py's `SPACE_MODEL` line names it.
- The hardware decides python_version, the torch pin and `suggested_hardware`. ZeroGPU runs only the Python and
  torch versions it lists (ZEROGPU_PYTHON, ZEROGPU_TORCH) and needs the `spaces` package, which app.py imports
  before torch (see app.py's docstring for what ZeroGPU changes at run time).
- Only the standard library and `errors` are imported: building a Space must not wait for torch to load.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import QwenOmniError

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20
MAX_FILE = 10 * MB  # any file over this must go through LFS/Xet
MAX_BINARY = 1 * MB  # the lower limit reported for binary files

# Flavors the Hub accepts (huggingface_hub.SpaceHardware; tests/test_space.py checks this list against it), and
# the short names the command also takes.
HARDWARE = ("cpu-basic", "cpu-upgrade", "zero-a10g", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4",
            "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8",
            "rtx-pro-6000", "rtx-pro-6000x2", "rtx-pro-6000x4", "rtx-pro-6000x8")
ALIASES = {"cpu": "cpu-basic", "zero-gpu": "zero-a10g", "zerogpu": "zero-a10g", "t4": "t4-small", "l4": "l4x1",
           "l40s": "l40sx1", "a10g": "a10g-small", "a100": "a100-large"}
# What ZeroGPU runs, from the Hub's ZeroGPU page (huggingface/hub-docs docs/hub/spaces-zerogpu.md; Python 3.12 and
# torch 2.9 came with hub-docs PR #2153, 2.12.1 and 2.13.0 with PR #2763). Other versions fail the Space's build.
ZEROGPU_PYTHON = ("3.10.13", "3.12.12")
ZEROGPU_TORCH = ("2.8.0", "2.9.1", "2.10.0", "2.11.0", "2.12.1", "2.13.0")
PYTHON = "3.11"  # elsewhere: the version the test suite runs on

LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.gguf", "*.npy", "*.npz",  # weights, arrays
    "*.wav", "*.mp3", "*.flac", "*.ogg", "*.oga", "*.opus", "*.m4a", "*.aac",  # audio
    "*.mp4", "*.webm", "*.mov", "*.mkv", "*.avi",  # video
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.bmp", "*.tif", "*.tiff",  # images
)
SOURCES = ("qwen_omni", "encoders", "assets/examples")  # copied as they are (caches left out)
SPACE_MODEL_LINE = re.compile(r"^SPACE_MODEL: str \| None = None\b.*$", re.M)  # app.py's line naming the model
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SpaceError(QwenOmniError):
    """The Space folder cannot be written as asked (the message says what to change)."""


@dataclass
class Space:
    path: Path
    hardware: str
    model: str  # "embedded", a Hub id, or the local directory that was copied to model/
    files: int
    bytes: int
    lfs_paths: list[str]  # files whose exact path had to be added to .gitattributes

    def upload_command(self, repo: str = "USER/NAME") -> str:
        return f"hf upload {repo} {self.path} . --repo-type space"


# ------------------------------------------------------------------------------------------------ hardware

def resolve_hardware(name: str) -> str:
    flavor = ALIASES.get(name, name)
    if flavor not in HARDWARE:
        raise SpaceError(f"unknown hardware {name!r}; use one of {', '.join(sorted({*HARDWARE, *ALIASES}))}")
    return flavor


def is_zero_gpu(flavor: str) -> bool:
    return flavor.startswith("zero-")


def python_version(flavor: str) -> str:
    return ZEROGPU_PYTHON[-1] if is_zero_gpu(flavor) else PYTHON


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def torch_pin(flavor: str, wanted: str) -> str:
    """The torch version to pin: the runtime requirement's own, or on ZeroGPU the newest listed one not above it
    (the code base is tested on `wanted`; an older listed release is the closest ZeroGPU can run)."""
    if not is_zero_gpu(flavor) or wanted in ZEROGPU_TORCH:
        return wanted
    older = [v for v in ZEROGPU_TORCH if _version(v) <= _version(wanted)]
    if not older:
        raise SpaceError(f"torch {wanted} is older than every version ZeroGPU runs ({', '.join(ZEROGPU_TORCH)})")
    return max(older, key=_version)


# ------------------------------------------------------------------------------------------------ files

def runtime_requirements(flavor: str, source: Path | None = None) -> str:
    """The repository's requirements.txt (runtime only) with the torch pin for `flavor`, plus `spaces` on
    ZeroGPU. Comments are kept so the file still says why each line is there."""
    lines = (source or ROOT / "requirements.txt").read_text().splitlines()
    torch_lines = [i for i, line in enumerate(lines) if re.match(r"\s*torch\s*==", line)]
    if len(torch_lines) != 1:
        raise SpaceError("requirements.txt must pin torch exactly once (torch==X.Y.Z) to derive the Space's pin")
    wanted = lines[torch_lines[0]].split("==", 1)[1].split("#")[0].strip()
    lines[torch_lines[0]] = f"torch=={torch_pin(flavor, wanted)}"
    if is_zero_gpu(flavor):
        lines += ["# ZeroGPU: attaches a GPU per call to the functions app.py decorates with spaces.GPU",
                  "spaces>=0.51.3"]
    return "\n".join(lines) + "\n"


def gradio_version(source: Path | None = None) -> str:
    m = re.search(r"^gradio==([\w.]+)", (source or ROOT / "requirements.txt").read_text(), re.M)
    if m is None:
        raise SpaceError("requirements.txt must pin gradio (gradio==X.Y.Z): it is the Space's sdk_version")
    return m.group(1)


def _yaml(meta: dict) -> str:
    """A flat YAML block: strings as JSON strings (valid YAML), booleans, lists of strings."""
    out = []
    for key, value in meta.items():
        if isinstance(value, bool):
            out.append(f"{key}: {'true' if value else 'false'}")
        elif isinstance(value, list):
            out.append(f"{key}:" + "".join(f"\n  - {json.dumps(v, ensure_ascii=False)}" for v in value))
        else:
            out.append(f"{key}: {json.dumps(str(value), ensure_ascii=False)}")
    return "---\n" + "\n".join(out) + "\n---\n"


def space_metadata(flavor: str, hub_model: str | None) -> dict:
    meta = {"title": "Qwen-Omni", "emoji": "🎧", "colorFrom": "indigo", "colorTo": "purple", "sdk": "gradio",
            "sdk_version": gradio_version(), "python_version": python_version(flavor), "app_file": "app.py",
            "pinned": False, "license": "apache-2.0", "suggested_hardware": flavor,
            "short_description": "Ask about images, audio and video (Qwen-Omni, PyTorch)"}
    if hub_model:
        # fetched while the Space builds, so the first start only loads it; a big checkpoint still needs more
        # than the default 30 minutes to download and load
        meta.update({"models": [hub_model], "preload_from_hub": [hub_model], "startup_duration_timeout": "1h"})
    return meta


def readme(meta: dict, flavor: str, model: str) -> str:
    zero = ("\n## ZeroGPU\n\nThe model is loaded onto `cuda` when the app starts (ZeroGPU moves it to a GPU for each "
            "call), with its talker, so spoken replies need no loading inside a call. Each reply runs in a GPU worker "
            "under `@spaces.GPU`, whose `duration` grows with the requested new tokens and with speech. State that "
            "the worker changes does not survive it: the prefix cache (a follow-up turn is prefilled again in full) "
            "and anything loaded lazily. The chat history lives in the browser, so nothing else is lost.\n"
            if is_zero_gpu(flavor) else "")
    return (_yaml(meta) + f"\n# Qwen-Omni\n\nA multimodal chat (images, audio, video; spoken replies) on **{model}**, "
            f"built with `python -m qwen_omni space` for `{flavor}` hardware. Upload this folder with\n\n```bash\n"
            f"hf upload USER/NAME . . --repo-type space\n```\n\n(from inside it; `hf` sends large files through Xet). "
            "Pushing with git works too: `.gitattributes` routes weights and media through LFS.\n" + zero)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8000)  # git's own test


def matches_lfs(rel: str, patterns: list[str]) -> bool:
    """Whether .gitattributes patterns cover `rel` (a path relative to the folder, with '/'): a pattern without
    '/' matches the file name at any depth, one with '/' the whole path (gitattributes' rules, minus globstars)."""
    from fnmatch import fnmatchcase

    name = rel.rsplit("/", 1)[-1]
    return any(fnmatchcase(rel if "/" in p else name, p) for p in patterns)


def oversize(path: Path, size: int) -> bool:
    return size > MAX_FILE or (size > MAX_BINARY and _is_binary(path))


def gitattributes(folder: Path) -> tuple[str, list[str]]:
    """The .gitattributes text and the files that had to be listed by exact path."""
    extra = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if not matches_lfs(rel, list(LFS_PATTERNS)) and oversize(f, f.stat().st_size):
            extra.append(rel.replace(" ", "[[:space:]]"))  # gitattributes has no quoting; this is git's advice
    rules = [f"{p} filter=lfs diff=lfs merge=lfs -text" for p in (*LFS_PATTERNS, *extra)]
    head = "# weights, audio, video, images and any other big file go through LFS/Xet\n"
    return head + "\n".join(rules) + "\n", extra


# ------------------------------------------------------------------------------------------------ build

def _prepare(out: Path, force: bool) -> None:
    out_r = out.resolve()
    if out_r == ROOT or out_r in ROOT.parents or any(out_r.is_relative_to(ROOT / s) for s in (*SOURCES, "assets")):
        raise SpaceError(f"{out} would overlap the sources it copies; pick a folder outside {ROOT} or beside them")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SpaceError(f"{out} is not empty; pick a new folder or pass --force to replace a previous build")
        if not (out / "app.py").is_file() or not (out / ".gitattributes").is_file():
            raise SpaceError(f"{out} does not look like a Space built by this command; not replacing it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def build_space(out: str | Path, model: str | None = None, hardware: str = "cpu-basic", force: bool = False
                ) -> Space:
    flavor = resolve_hardware(hardware)
    out = Path(out)
    local = Path(model).expanduser() if model else None
    if model and not local.is_dir() and not HUB_ID.match(model):
        raise SpaceError(f"--model {model!r} is neither a directory nor a Hub id such as Qwen/Qwen2.5-Omni-3B")
    if model and local.is_dir() and not (local / "config.json").is_file():
        raise SpaceError(f"{local} has no config.json: not a checkpoint directory")
    app = (ROOT / "app.py").read_text()
    if len(SPACE_MODEL_LINE.findall(app)) != 1:
        raise SpaceError("app.py must start exactly one line with 'SPACE_MODEL: str | None = None' (the Space names "
                         "its model there)")
    _prepare(out, force)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for src in SOURCES:
        shutil.copytree(ROOT / src, out / src, ignore=ignore)
    hub_model = None
    if model is None:
        shutil.copytree(ROOT / "assets" / "tiny-omni", out / "assets" / "tiny-omni", ignore=ignore)
        name = "the embedded tiny-omni model"
    elif local.is_dir():
        shutil.copytree(local, out / "model", ignore=ignore)
        app = SPACE_MODEL_LINE.sub('SPACE_MODEL: str | None = "model"  # copied in by qwen_omni space', app)
        name = f"the checkpoint {local.name}"
    else:
        hub_model = model
        app = SPACE_MODEL_LINE.sub(lambda _: f"SPACE_MODEL: str | None = {json.dumps(model)}  # set by qwen_omni space",
                                   app)
        name = f"[{model}](https://huggingface.co/{model})"
    (out / "app.py").write_text(app)
    (out / "requirements.txt").write_text(runtime_requirements(flavor))
    shutil.copy2(ROOT / "packages.txt", out / "packages.txt")
    (out / "README.md").write_text(readme(space_metadata(flavor, hub_model), flavor, name))
    text, extra = gitattributes(out)
    (out / ".gitattributes").write_text(text)
    files = [p for p in out.rglob("*") if p.is_file()]
    return Space(out, flavor, model or "embedded", len(files), sum(p.stat().st_size for p in files), extra)


def run_space(args) -> int:
    """`python -m qwen_omni space` (its parser lives in cli.py)."""
    space = build_space(args.dir, model=args.model, hardware=args.hardware, force=args.force)
    print(f"wrote {space.files} files ({space.bytes / MB:.1f} MB) to {space.path} for {space.hardware}"
          + (f"; listed in .gitattributes by path: {', '.join(space.lfs_paths)}" if space.lfs_paths else ""))
    print(f"upload it with:\n  {space.upload_command()}")
    return 0
