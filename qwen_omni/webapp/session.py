"""Everything the web app does that is not drawing widgets: uploads, history <-> messages, streaming.

Design
- `app.py` is a thin Gradio layer; this module holds the logic so it can be tested without a browser and so the
  library never imports gradio. Values crossing the boundary are plain dicts/lists in Gradio's "messages" shape.
- Settings (flags, environment, loading the model, launch options) live in `settings.py`.
- The browser's chat history is the source of truth: every turn re-sends the whole conversation. The library's
  `PrefixCache` notices the shared prefix and prefills only the new tokens, so there is no caching here.
- History entries the model must not see are recognisable from their shape alone (no side state, so
  Undo/Regenerate/reloads cannot desynchronise it): error bubbles carry `metadata.title == ERROR_TITLE`, and
  the small stats footer under each reply is a trailing `<sub title="reply stats">…</sub>` line. A user turn
  whose answer ended in an error is dropped from the model's context too, otherwise one corrupt upload would
  break every later turn.
- Errors a user can cause (`QwenOmniError`, `ValueError` incl. `encoders.media.MediaError`) are shown verbatim;
  anything else is logged here with its traceback and the user sees a generic line (no trace reaches the page).

Examples: `assets/examples/examples.json` is a list of `{"file": "<name in assets/examples>" | null,
"text": "<question>"}` (or `"files": [...]` for several). Entries whose files are missing are skipped; media files
in the folder that no entry mentions get a generic question for their kind.
"""
from __future__ import annotations

import json
import logging
import mimetypes
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..engine.reasoning import OPEN, split
from ..errors import InputError, QwenOmniError
from ..speech.offline_voice import SAMPLE_RATE, wav_bytes

log = logging.getLogger("qwen_omni.app")

ROOT = Path(__file__).resolve().parents[2]  # the repository: qwen_omni/webapp/session.py -> ../..
EXAMPLES_DIR = ROOT / "assets" / "examples"
# spoken replies and voice turns kept as files, so they stay playable in the chat (Gradio serves the temp dir)
AUDIO_DIR = Path(tempfile.gettempdir()) / "qwen-omni-audio"
ERROR_TITLE = "⚠ Error"  # U+26A0 without the emoji selector: common text fonts have it
GENERIC_ERROR = "Something went wrong on the server while answering (it has been logged). Please try again."
MB = 1 << 20
# Per-kind upload caps: far above what the processors keep (they resample/subsample), low enough that one
# request cannot make the server decode gigabytes.
MAX_BYTES = {"image": 20 * MB, "audio": 50 * MB, "video": 200 * MB}
MAX_FILES = 8
EXTENSIONS = {
    "image": {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"},
    "audio": {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".weba"},
    "video": {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpeg", ".mpg"},
}
DEFAULT_QUESTIONS = {"image": "Describe this image.", "audio": "What do you hear in this recording?",
                     "video": "What happens in this video?"}
STATS_TAG = '<sub title="reply stats">'
_STATS_FOOTER = re.compile(r"\s*" + re.escape(STATS_TAG) + r"[^<]*</sub>\s*$")


# ------------------------------------------------------------------------------------------------ model card

def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def model_card(assistant) -> str:
    if getattr(assistant, "is_remote", False):
        return f"- **Model:** {assistant.model}\n- **Served by:** {assistant.base_url} (OpenAI-compatible API)"
    total, active = assistant.num_parameters, assistant.num_active_parameters
    arch = "MoE" if active < total or "moe" in assistant.kind.lower() else "dense"
    dtype = str(assistant.dtype).replace("torch.", "")
    rows = [("Name", assistant.path.name), ("Family", assistant.kind), ("Architecture", arch),
            ("Parameters", f"{human_count(total)} total, {human_count(active)} active per token"),
            ("Context window", f"{assistant.context_window:,} tokens"), ("Device", str(assistant.device)),
            ("dtype", dtype)]
    return "\n".join(f"- **{k}:** {v}" for k, v in rows)


def stats_line(stats: dict) -> str:
    """One small line under a reply; absent numbers are left out rather than shown as zero."""
    parts = []
    if stats.get("time_to_first_token") is not None:
        parts.append(f"first token {stats['time_to_first_token']:.2f} s")
    if stats.get("tokens_per_second") is not None:
        parts.append(f"{stats['tokens_per_second']:.1f} tokens/s")
    if "prompt_tokens" in stats:
        reused = f" ({stats.get('reused_tokens', 0)} reused)" if stats.get("reused_tokens") else ""
        parts.append(f"{stats['prompt_tokens']} in{reused} → {stats.get('completion_tokens', 0)} out")
    if stats.get("encode_time") is not None:
        parts.append(f"media encode {stats['encode_time']:.2f} s")
    if stats.get("time_to_first_audio") is not None:
        parts.append(f"first audio {stats['time_to_first_audio']:.2f} s")
    if stats.get("real_time_factor") is not None:  # speech compute time / speech duration (< 1: faster than real time)
        parts.append(f"RTF {stats['real_time_factor']:.2f}")
    return STATS_TAG + " · ".join(parts) + "</sub>"


# ------------------------------------------------------------------------------------------------ speech

def voice_choices(assistant) -> list[str]:
    """Voices a spoken reply can use (first = default): the talker's for full Omni checkpoints, the offline voice's
    for other local models, none for a remote backend or a model loaded with speech=False."""
    speech = getattr(assistant, "speech", None)
    return list(speech.voices) if speech is not None else []


# ------------------------------------------------------------------------------------------------ uploads

def media_kind(path: str, mime: str | None = None) -> str | None:
    """'image' / 'audio' / 'video' from the MIME type Gradio reports, else from the file name."""
    mime = mime or mimetypes.guess_type(path)[0] or ""
    if mime.split("/")[0] in MAX_BYTES:
        return mime.split("/")[0]
    ext = Path(path).suffix.lower()
    return next((k for k, exts in EXTENSIONS.items() if ext in exts), None)


def validate_upload(path: str, mime: str | None = None) -> str:
    """The upload's kind; `InputError` (shown to the user) when its type, size or presence is wrong."""
    name = Path(path).name
    kind = media_kind(path, mime)
    if kind is None:
        raise InputError(f"'{name}' is not an image, audio or video file; those are what this assistant reads")
    try:
        size = Path(path).stat().st_size
    except OSError:
        raise InputError(f"the upload '{name}' did not reach the server; please attach it again") from None
    if size == 0:
        raise InputError(f"'{name}' is empty (0 bytes)")
    if size > MAX_BYTES[kind]:
        raise InputError(f"'{name}' is {size / MB:.0f} MB; {kind} uploads are limited to {MAX_BYTES[kind] // MB} MB")
    return kind


def find_examples(folder: Path | None = None) -> list[dict]:
    """MultimodalTextbox values ({"text", "files"}) for the examples that exist on disk."""
    folder = folder or EXAMPLES_DIR
    if not folder.is_dir():
        return []
    entries: list[dict] = []
    spec = folder / "examples.json"
    if spec.is_file():
        try:
            entries = json.loads(spec.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring %s: %s", spec, e)
    out, used = [], set()
    for entry in entries if isinstance(entries, list) else []:
        names = entry.get("files") or ([entry["file"]] if entry.get("file") else [])
        if all((folder / n).is_file() for n in names) and (names or entry.get("text")):
            out.append({"text": entry.get("text", ""), "files": [str(folder / n) for n in names]})
            used.update(names)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in used and (kind := media_kind(str(f))):
            out.append({"text": DEFAULT_QUESTIONS[kind], "files": [str(f)]})
    return out


# ------------------------------------------------------------------------------------------------ history

def _parts(content: Any) -> list[tuple[str, str, str | None]]:
    """A Gradio message's content as [("text", text, None) | ("file", path, mime)], whatever shape it came in."""
    items = content if isinstance(content, list) else [content]
    out = []
    for c in items:
        if isinstance(c, str):
            out.append(("text", c, None))
        elif isinstance(c, dict) and c.get("type") == "text":
            out.append(("text", c.get("text", ""), None))
        elif isinstance(c, dict) and isinstance(c.get("file"), dict):
            out.append(("file", c["file"]["path"], c["file"].get("mime_type")))
        elif isinstance(c, dict) and c.get("type") == "file" and isinstance(c.get("file"), str):
            out.append(("file", c["file"], None))  # what gradio_client hands back: a path
        elif isinstance(c, dict) and "path" in c:
            out.append(("file", c["path"], c.get("mime_type")))
    return out


def api_history(history: list[dict]) -> list[dict]:
    """The history in the typed shape of Gradio's messages (every content a list of {"type": "text"|"file"} parts),
    which a gradio_client user can send back as it is (after `handle_file` on the file parts)."""
    out = []
    for m in history:
        parts = [{"type": "text", "text": v} if kind == "text" else
                 {"type": "file", "file": {"path": v, **({"mime_type": mime} if mime else {})}}
                 for kind, v, mime in _parts(m.get("content"))]
        out.append({**m, "content": parts, "metadata": m.get("metadata")})
    return out


def is_error(msg: dict) -> bool:
    return (msg.get("metadata") or {}).get("title") == ERROR_TITLE


def _turns(history: list[dict]) -> list[tuple[list[dict], list[dict]]]:
    """[(user messages, assistant messages)] with consecutive same-role messages grouped."""
    turns: list[tuple[list[dict], list[dict]]] = []
    for m in history:
        if m.get("role") == "user":
            if not turns or turns[-1][1]:
                turns.append(([], []))
            turns[-1][0].append(m)
        elif m.get("role") == "assistant" and turns:
            turns[-1][1].append(m)
    return turns


def history_to_messages(history: list[dict], system_prompt: str = "") -> list[dict]:
    """Gradio chat history -> library messages (media first, then text, in each user turn)."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt.strip()}]}] \
        if system_prompt and system_prompt.strip() else []
    for users, replies in _turns(history):
        if any(is_error(r) for r in replies):
            continue
        media, texts = [], []
        for m in users:
            for kind, value, mime in _parts(m["content"]):
                if kind == "text":
                    texts.append(value)
                else:
                    k = media_kind(value, mime) or "file"
                    media.append({"type": k, k: value})
        text = "\n".join(t for t in texts if t)
        messages.append({"role": "user", "content": media + ([{"type": "text", "text": text}] if text else [])})
        reply = "".join(v for r in replies if not (r.get("metadata") or {}).get("title")
                        for kind, v, _ in _parts(r["content"]) if kind == "text")
        reply = split(_STATS_FOOTER.sub("", reply), False)[1]  # a thinking model's reasoning is not re-sent
        if reply:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return messages


def audio_message(chunks: list[np.ndarray], stem: str, role: str = "assistant", rate: int = SAMPLE_RATE) -> dict:
    """The audio chunks as one WAV file under AUDIO_DIR, as a chat message that plays it."""
    AUDIO_DIR.mkdir(parents=True, exist_ok=True)
    path = AUDIO_DIR / f"{stem}-{uuid.uuid4().hex[:12]}.wav"
    path.write_bytes(wav_bytes(np.concatenate(chunks), rate))
    return {"role": role, "content": {"path": str(path)}}


def user_message(text: str, files: list[str]) -> dict:
    return {"role": "user", "content": [{"path": f} for f in files] + ([text] if text else [])}


def error_message(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": ERROR_TITLE}}


def split_last_turn(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """(history before the last user turn, that turn's user messages); ([], []) shapes when there is none."""
    last = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=None)
    if last is None:
        return list(history), []
    first = last
    while first > 0 and history[first - 1].get("role") == "user":
        first -= 1
    return list(history[:first]), list(history[first:last + 1])


def edit(history: list[dict], index: int, text: str) -> list[dict]:
    """The conversation up to the user message at `index`, whose text becomes `text` (its files are kept)."""
    msg = history[index]
    files = [{"path": v} for kind, v, _ in _parts(msg["content"]) if kind == "file"]
    return [*history[:index], {"role": "user", "content": [*files, *([text] if text else [])]}]


def undo(history: list[dict]) -> tuple[list[dict], dict | None]:
    """Drop the last user turn and its reply; give back its text and files to put in the input box."""
    before, turn = split_last_turn(history)
    if not turn:
        return list(history), None
    parts = [p for m in turn for p in _parts(m["content"])]
    return before, {"text": "\n".join(v for k, v, _ in parts if k == "text"),
                    "files": [v for k, v, _ in parts if k == "file"]}


# ------------------------------------------------------------------------------------------------ replying

@dataclass
class Sampling:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 512
    seed: int | None = None
    use_audio_in_video: bool = True
    speak: bool = False  # also speak the reply (see qwen_omni/speech/switch.py)
    voice: str = "default"


class ChatSession:
    """Streams replies into a Gradio history; yields (history, warning or None) after every change.

    with_audio=True: yields (history, warning, audio) instead, audio being a WAV chunk (bytes) of the spoken reply
    when `Sampling.speak` produced one since the last step, else None.
    """

    def __init__(self, assistant, max_new_tokens: int = 1024):
        self.assistant, self.max_new_tokens = assistant, max_new_tokens

    def submit(self, message: dict | None, history: list[dict], system_prompt: str, sampling: Sampling,
               extra_files: list[str] = (), with_audio: bool = False) -> Iterator[tuple]:
        steps = self._submit(message, history, system_prompt, sampling, extra_files)
        return steps if with_audio else _text_only(steps)

    def _submit(self, message, history, system_prompt, sampling, extra_files) -> Iterator[tuple]:
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f for f in list(message.get("files") or []) + list(extra_files) if f]
        files = [f.get("path") if isinstance(f, dict) else f for f in files]
        history = list(history or [])
        if not text and not files:
            yield history, "Type a question or attach an image, audio or video first.", None
            return
        history.append(user_message(text, files))
        try:
            if len(files) > MAX_FILES:
                raise InputError(f"{len(files)} files attached; send at most {MAX_FILES} per message")
            for f in files:
                validate_upload(f)
        except InputError as e:
            yield [*history, error_message(str(e))], str(e), None
            return
        yield from self.reply(history, system_prompt, sampling, with_audio=True)

    def regenerate(self, history: list[dict], system_prompt: str, sampling: Sampling, with_audio: bool = False
                   ) -> Iterator[tuple]:
        before, turn = split_last_turn(history or [])
        if not turn:
            step = (list(history or []), "There is no question to answer again yet.", None)
            return iter([step if with_audio else step[:2]])
        return self.reply(before + turn, system_prompt, sampling, with_audio)

    def reply(self, history: list[dict], system_prompt: str, sampling: Sampling, with_audio: bool = False
              ) -> Iterator[tuple]:
        """Stream the assistant's answer to the conversation in `history` (which ends with a user turn)."""
        steps = self._reply(history, system_prompt, sampling)
        return steps if with_audio else _text_only(steps)

    def _reply(self, history: list[dict], system_prompt: str, sampling: Sampling) -> Iterator[tuple]:
        stats: dict = {}
        text, answer, spoken = "", None, []
        opened = OPEN if getattr(self.assistant, "reasoning_mode", None) else ""
        yield history, None, None  # show the user's turn (and the pending indicator) before the first token
        stream = None
        try:
            messages = history_to_messages(history, system_prompt)
            seed = None if sampling.seed is None or sampling.seed < 0 else int(sampling.seed)
            speech = {"speech": True, "voice": sampling.voice or "default"} if sampling.speak else {}
            stream = self.assistant.chat(
                messages, max_new_tokens=max(1, min(int(sampling.max_new_tokens), self.max_new_tokens)),
                temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=int(sampling.top_k),
                seed=seed, stream=True, stats=stats, use_audio_in_video=bool(sampling.use_audio_in_video), **speech)
            for piece in stream:
                if not isinstance(piece, str):  # an audio chunk of the spoken reply
                    if piece.size:
                        spoken.append(piece)
                        yield [*history, answer] if answer else history, None, wav_bytes(piece)
                    continue
                text += piece
                # the Chatbot folds <think>...</think> into a thought; a template that opens it in the prompt
                # leaves only the closing tag in the reply, so the opening one is put back for display
                answer = {"role": "assistant", "content": opened + text}
                yield [*history, answer], None, None
            answer = {"role": "assistant", "content": f"{opened}{text}\n\n{stats_line(stats)}"}
            yield [*history, answer, *([audio_message(spoken, "reply")] if spoken else [])], None, None
        except (QwenOmniError, ValueError) as e:
            yield [*history, *([answer] if answer else []), error_message(str(e))], str(e), None
        except Exception:  # noqa: BLE001 - a bug: keep the trace in the server log, not in the browser
            log.exception("reply failed")
            yield [*history, *([answer] if answer else []), error_message(GENERIC_ERROR)], GENERIC_ERROR, None
        finally:
            # Stop closes this generator; close the library's stream too so its lock and KV state are released
            # now rather than whenever the garbage collector gets to it.
            if stream is not None:
                stream.close()


def _text_only(steps: Iterator[tuple]) -> Iterator[tuple[list[dict], str | None]]:
    """(history, warning) steps for callers without a player: audio-only steps are dropped."""
    try:
        for history, warning, audio in steps:
            if audio is None:
                yield history, warning
    finally:
        steps.close()  # Stop closes this generator: close the reply (and the library stream) with it
