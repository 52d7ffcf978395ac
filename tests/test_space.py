"""`python -m qwen_omni space`: the folders it writes, checked against the Hub's rules, and app.py's ZeroGPU wiring.

Two folders are built once per module, as a user builds them: the embedded model for cpu-basic and a Hub id for
ZeroGPU (nothing is downloaded: the builder never touches the network). Their YAML is read with huggingface_hub's
own metadata loader. The ZeroGPU wiring is checked with the real `spaces` package, which is inert off ZeroGPU: what
it would do with a GPU cannot be run here. The fresh-venv check (pip installs the folder's requirements into a new
venv, then `python app.py`, `chat` and `serve` run from inside the folder and a browser gets an answer) takes
minutes, so it runs only with QWEN_OMNI_SPACE_VENV=1.
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_omni.webapp import space as sp

ROOT = Path(__file__).resolve().parent.parent
HUB_MODEL = "Qwen/Qwen2.5-Omni-3B"
TEST_ONLY = {"transformers", "pytest", "playwright", "openai", "pytest-timeout", "pytest-benchmark"}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return sp.build_space(tmp_path_factory.mktemp("space") / "embedded")


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    """Built through the command line, timed: a fresh clone's `space` must take seconds."""
    out = tmp_path_factory.mktemp("space") / "zero"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "qwen_omni", "space", str(out), "--model", HUB_MODEL,
                        "--hardware", "zero-gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert f"hf upload USER/NAME {out} . --repo-type space" in r.stdout
    return {"path": out, "seconds": time.monotonic() - t0}


def lfs_patterns(folder: Path) -> list[str]:
    lines = (folder / ".gitattributes").read_text().splitlines()
    return [line.split()[0] for line in lines if "filter=lfs" in line]


def requirement_names(folder: Path) -> dict[str, str]:
    out = {}
    for line in (folder / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[=<>!~\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
            out[name] = line
    return out


def check_push_rules(folder: Path) -> list[str]:
    """Files the Hub would refuse: over 10 MB, or binary over 1 MB, that .gitattributes does not send through LFS,
    as git itself reads .gitattributes (`git check-attr` in a scratch repository)."""
    big = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and ".git" not in f.relative_to(folder).parts:
            size = f.stat().st_size
            if size > 10 * sp.MB or (size > sp.MB and b"\0" in f.read_bytes()[:8000]):
                big.append(f.relative_to(folder).as_posix())
    if not big:
        return []
    if not (folder / ".git").exists():
        subprocess.run(["git", "init", "-q", str(folder)], check=True)
    out = subprocess.run(["git", "check-attr", "filter", "--stdin", "-z"], cwd=folder, input="\0".join(big) + "\0",
                         capture_output=True, text=True, check=True).stdout.split("\0")
    return [path for path, _, value in zip(out[0::3], out[1::3], out[2::3]) if value != "lfs"]


def metadata(folder: Path) -> dict:
    from huggingface_hub import RepoCard
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(folder / "README.md")
    card = RepoCard.load(folder / "README.md", repo_type="space")  # the Hub's own card parser accepts it too
    assert card.data.to_dict() == meta
    return meta


# ------------------------------------------------------------------------------------------ the folders

def test_embedded_space_for_cpu_basic(embedded):
    folder = embedded.path
    assert embedded.hardware == "cpu-basic" and not embedded.lfs_paths
    weights = folder / "assets" / "tiny-omni" / "model.safetensors"
    assert weights.stat().st_size == (ROOT / "assets/tiny-omni/model.safetensors").stat().st_size > 10 * sp.MB
    assert sp.matches_lfs("assets/tiny-omni/model.safetensors", lfs_patterns(folder))
    assert all(sp.matches_lfs(f"assets/examples/{n}", lfs_patterns(folder))
               for n in ("beeps.wav", "moving.mp4", "number.jpg", "shapes.png", "spoken.mp3"))
    assert check_push_rules(folder) == [] and sp.matches_lfs("a/b.safetensors", ["*.safetensors"])
    assert not list(folder.rglob("__pycache__")) and (folder / "qwen_omni" / "webapp" / "space.py").is_file()
    assert re.search(r"^SPACE_MODEL: str \| None = None", (folder / "app.py").read_text(), re.M)

    import gradio
    from huggingface_hub import SpaceHardware

    meta = metadata(folder)
    assert (meta["sdk"], meta["sdk_version"], meta["app_file"]) == ("gradio", gradio.__version__, "app.py")
    assert (folder / meta["app_file"]).is_file() and meta["python_version"] == sp.PYTHON
    assert meta["suggested_hardware"] in {h.value for h in SpaceHardware}
    assert len(meta["short_description"]) <= 60  # the Hub's limit for this field
    assert "models" not in meta and "preload_from_hub" not in meta  # the model is in the folder

    reqs = requirement_names(folder)
    assert not TEST_ONLY & set(reqs), reqs
    assert reqs["torch"] == requirement_names(ROOT)["torch"] and "spaces" not in reqs
    assert set(requirement_names(ROOT)) <= set(reqs)  # everything the runtime needs
    assert (folder / "packages.txt").read_text() == (ROOT / "packages.txt").read_text()


def test_hub_space_for_zero_gpu(zero):
    folder = zero["path"]
    assert zero["seconds"] < 60, zero  # seconds: no torch work, no download
    assert not (folder / "assets" / "tiny-omni").exists() and not (folder / "model").exists()
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 2 * sp.MB  # nothing downloaded
    assert check_push_rules(folder) == []
    app = (folder / "app.py").read_text()
    assert f'SPACE_MODEL: str | None = "{HUB_MODEL}"' in app

    meta = metadata(folder)
    assert meta["suggested_hardware"] == "zero-a10g" and meta["sdk"] == "gradio"
    # ZeroGPU runs Python 3.10 or 3.12 only, at the exact versions its page lists
    assert meta["python_version"] in sp.ZEROGPU_PYTHON and meta["python_version"][:4] in ("3.10", "3.12")
    assert meta["models"] == [HUB_MODEL] and meta["preload_from_hub"] == [HUB_MODEL]
    assert re.fullmatch(r"\d+[smh]", meta["startup_duration_timeout"])
    reqs = requirement_names(folder)
    assert not TEST_ONLY & set(reqs), reqs
    assert reqs["torch"].split("==")[1] in sp.ZEROGPU_TORCH and "spaces" in reqs
    assert "ZeroGPU" in (folder / "README.md").read_text() and "prefix cache" in (folder / "README.md").read_text()


def test_local_checkpoint_and_files_over_the_limits(tmp_path):
    """A local checkpoint is copied to model/; a big text file and a binary with an unknown extension, which no
    pattern covers, are routed through LFS by exact path."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (ckpt / name).write_bytes((ROOT / "assets/tiny-omni" / name).read_bytes())
    (ckpt / "vocab big.txt").write_text("word\n" * (2 * sp.MB + 1))  # 10 MB + 5 bytes of text
    (ckpt / "codes.dat").write_bytes(b"\0" * (sp.MB + 1))
    s = sp.build_space(tmp_path / "out", model=str(ckpt), hardware="t4")
    assert s.hardware == "t4-small" and sorted(s.lfs_paths) == ["model/codes.dat", "model/vocab[[:space:]]big.txt"]
    assert 'SPACE_MODEL: str | None = "model"' in (s.path / "app.py").read_text()
    assert check_push_rules(s.path) == [] and "model/codes.dat filter=lfs" in (s.path / ".gitattributes").read_text()
    (s.path / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    assert check_push_rules(s.path) == ["model/codes.dat", "model/vocab big.txt"]  # the check can fail


def test_hardware_names_and_torch_pins():
    from huggingface_hub import SpaceHardware

    assert set(sp.HARDWARE) <= {h.value for h in SpaceHardware}
    assert {sp.resolve_hardware(a) for a in sp.ALIASES} <= set(sp.HARDWARE)
    assert sp.torch_pin("cpu-basic", "2.99.0") == "2.99.0"
    assert sp.torch_pin("zero-a10g", "2.13.0") == "2.13.0"
    assert sp.torch_pin("zero-a10g", "2.12.0") == "2.11.0"  # not listed: the newest listed one below it
    with pytest.raises(sp.SpaceError, match="older than every version"):
        sp.torch_pin("zero-a10g", "2.7.1")


def test_refusals_are_clear(tmp_path, embedded):
    with pytest.raises(sp.SpaceError, match="unknown hardware 'h100'"):
        sp.build_space(tmp_path / "a", hardware="h100")
    with pytest.raises(sp.SpaceError, match="neither a directory nor a Hub id"):
        sp.build_space(tmp_path / "a", model="no such/dir/here")
    with pytest.raises(sp.SpaceError, match="no config.json"):
        sp.build_space(tmp_path / "a", model=str(tmp_path))
    with pytest.raises(sp.SpaceError, match="overlap"):
        sp.build_space(ROOT / "qwen_omni" / "space")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(sp.SpaceError, match="not empty"):
        sp.build_space(tmp_path / "mine")
    with pytest.raises(sp.SpaceError, match="does not look like a Space"):
        sp.build_space(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    from qwen_omni.cli import main

    assert main(["space", str(tmp_path / "mine")]) == 2  # the CLI prints the message, exits 2, no traceback
    assert sp.build_space(embedded.path, force=True).files == embedded.files  # a previous build is replaced


# ------------------------------------------------------------------------------------------ ZeroGPU wiring

IMPORT_ORDER = r"""
import importlib.abc, sys
order = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("spaces", "torch") and name not in order:
            order.append(name)
            if name == "spaces":  # torch must not have touched CUDA yet
                assert "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized()
        return None
sys.meta_path.insert(0, Watch())
import app
print(order, sys.modules["spaces"].__file__, sys.modules["qwen_omni"].__file__)
"""


def test_spaces_is_imported_before_torch(zero):
    pytest.importorskip("spaces", reason="pip install -r requirements-dev.txt (spaces)")
    env = {**os.environ, "SPACE_ID": "user/qwen-omni", "SYSTEM": "spaces", "GRADIO_ANALYTICS_ENABLED": "False"}
    r = subprocess.run([sys.executable, "-c", IMPORT_ORDER], cwd=zero["path"], capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in env.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("['spaces', 'torch']"), r.stdout
    assert str(zero["path"]) in r.stdout.split()[-1]  # the folder's own library, not this checkout's


@pytest.fixture(scope="module")
def recorded_gpu(monkeypatch_module):
    """The real spaces.GPU, with each decoration recorded."""
    spaces = pytest.importorskip("spaces", reason="pip install -r requirements-dev.txt (spaces)")
    calls, real = [], spaces.GPU

    def gpu(task=None, **kw):
        calls.append(kw)
        return real(task, **kw)

    monkeypatch_module.setattr(spaces, "GPU", gpu)
    return calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_gpu_callbacks_carry_a_duration_and_yield_picklable_values(recorded_gpu, tmp_path):
    import app
    import qwen_omni
    from qwen_omni.webapp import settings as st
    from qwen_omni.webapp import session as cs

    settings = st.parse_settings(["--max-new-tokens", "2000"], {})
    bot = qwen_omni.load()
    submit_steps, regenerate_steps = app.gpu_callbacks(cs.ChatSession(bot, settings.max_new_tokens), settings)
    assert len(recorded_gpu) == 2 and all(callable(kw.get("duration")) for kw in recorded_gpu)
    duration = recorded_gpu[0]["duration"]
    short, long_ = cs.Sampling(max_new_tokens=16), cs.Sampling(max_new_tokens=1024)
    spoken = cs.Sampling(max_new_tokens=1024, speak=True)
    assert 60 < duration(long_, None, [], "", []) < duration(spoken, None, [], "", []) <= st.GPU_SECONDS_MAX
    assert 0 < duration(short, None, [], "", []) < 60  # a short reply asks for less than the 60 s default
    assert duration(cs.Sampling(max_new_tokens=10**6, speak=True), None, [], "", []) == st.GPU_SECONDS_MAX

    import shutil

    speak = shutil.which("espeak-ng") is not None  # spoken chunks are WAV bytes; without espeak-ng, text only
    sampling = cs.Sampling(temperature=0.0, max_new_tokens=12, seed=0, speak=speak)
    message = {"text": "What colour is the star?", "files": [str(ROOT / "assets/examples/shapes.png")]}
    pickle.dumps((sampling, message, [], "", []))  # the arguments cross the fork too
    steps = list(submit_steps(sampling, message, [], "", []))
    steps += list(regenerate_steps(sampling, steps[-1][0], ""))
    for step in steps:
        assert pickle.loads(pickle.dumps(step)) == step
    # a spoken reply ends with its audio message, after the text one
    reply = next(m["content"] for m in reversed(steps[-1][0]) if isinstance(m["content"], str))
    assert reply.startswith("white") and "first token" in reply
    assert not speak or any(isinstance(s[2], bytes) for s in steps)


def test_zero_gpu_loads_on_cuda_with_the_talker(monkeypatch):
    from qwen_omni.webapp import settings as st
    from qwen_omni import assistant

    asked = {}

    def load(model, **kw):
        asked.update(kw)
        raise st.CheckpointError("stop here")  # no CUDA on this machine: only the arguments are checked

    monkeypatch.setattr(assistant, "load", load)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    with pytest.raises(st.CheckpointError):
        st.load_assistant(st.parse_settings(["--model", "m"], {}))
    assert (asked["device"], asked["speech"]) == ("cuda", True)
    monkeypatch.delenv("SPACES_ZERO_GPU")
    with pytest.raises(st.CheckpointError):
        st.load_assistant(st.parse_settings(["--model", "m"], {}))
    assert (asked["device"], asked["speech"]) == (None, "lazy")  # elsewhere nothing changes


# ------------------------------------------------------------------------------------------ fresh venv (opt-in)

VENV = os.environ.get("QWEN_OMNI_SPACE_VENV", "")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, ready: str, log: Path, timeout: float = 120) -> subprocess.Popen:
    """A server process whose output goes to `log`; returns once `ready` shows there."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.monotonic() + timeout
    while ready not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{cmd[1:]} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


@pytest.mark.skipif(not VENV, reason="minutes of pip: QWEN_OMNI_SPACE_VENV=1 (a new venv) or =PATH (reuse one)")
def test_fresh_venv_serves_the_space(embedded, tmp_path_factory):
    """Only the folder's requirements: `python app.py` from inside it answers in a browser; `chat` and `serve` run."""
    import httpx

    from tests.test_app import CHROMIUM, CHROMIUM_ARGS, first_screen, send, watch_reply

    venv = Path(VENV) if VENV != "1" else tmp_path_factory.mktemp("venv") / "v"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, folder, logs = str(venv / "bin" / "python"), embedded.path, tmp_path_factory.mktemp("logs")
    subprocess.run([py, "-m", "pip", "install", "-q", "-r", "requirements.txt"], cwd=folder, check=True, timeout=1200)
    probe = "import importlib.util as u; print([m for m in ('transformers', 'pytest', 'playwright', 'openai') " \
            "if u.find_spec(m)])"  # the runtime requirements bring none of the test stack
    assert subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"

    r = subprocess.run([py, "-m", "qwen_omni", "chat", "What colour is the star?", "--image",
                        "assets/examples/shapes.png", "--max-new-tokens", "8"], cwd=folder, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "white", (r.stdout, r.stderr[-2000:])

    port = free_port()
    serve = start([py, "-m", "qwen_omni", "serve", "--port", str(port)], folder, "Uvicorn running", logs / "serve.log")
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code != 200:  # still loading
            assert time.monotonic() < deadline, (logs / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "tiny-omni", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What can you do?"}]}).json()
        assert reply["choices"][0]["message"]["content"], reply
    finally:
        serve.terminate()
        serve.wait(30)

    port = free_port()
    app = start([py, "app.py", "--port", str(port)], folder, "serving at", logs / "app.log")
    try:
        if not Path(CHROMIUM).exists():
            pytest.skip("needs Debian's Chromium: apt-get install -y chromium")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page, box = first_screen(browser, f"http://127.0.0.1:{port}/")
                page.get_by_label("Temperature (0 = greedy)").first.fill("0")
                send(page, box, "What colour is the star?", files=[folder / "assets/examples/shapes.png"])
                seen = watch_reply(page, "first token", timeout=120)
                assert seen and seen[-1].startswith("white") and "first token" in seen[-1], seen[-3:]
            finally:
                browser.close()
    finally:
        app.terminate()
        app.wait(30)
