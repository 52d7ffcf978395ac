"""Voice latency: end of the user's speech -> first reply audio, over `WS /v1/realtime` vs. upload-then-chat.

    python bench/realtime.py                  # the embedded model, 10 turns each way, server in a child process
    python bench/realtime.py --silence-ms 400 --turns 10 --threads 1

The question is spoken by espeak-ng ("what is this word? cat"-like prompts, one per turn, cycled) at 24 kHz.
1. Realtime: a fresh session per turn with server VAD (`--silence-ms` of silence ends the turn). The client sends
   the recording in 20 ms frames at real-time pace (speech, then silence until the reply starts). Clock: from the
   moment the last frame holding speech has been sent (the end of the user's speech) to the first
   `response.output_audio.delta` received. It includes the VAD's silence wait, the prefill of the audio, the
   first sentence's text and its synthesis.
2. Upload then chat: at the same end of speech the client sends the speech part of the same recording (wav) as
   `input_audio` in a streamed chat completion with `modalities: ["text", "audio"]`; the clock runs to the first
   `delta.audio`. No VAD wait here: the client decides where the speech ended (push-to-talk).
Medians and all values are printed with the CPU model and flags. The server runs in its own process
(`python -m qwen_omni serve`), so client threads do not share its interpreter.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["What is this word? Cat.", "What word do you hear? Dog.", "What is this word? Tree.",
             "Which word is this? Bird.", "What is this word? Seven."]
RATE = 24000
FRAME = 480  # 20 ms


def cpu_info() -> str:
    model, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f in have]
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores; {' '.join(flags)})"


def speech(text: str) -> np.ndarray:
    """espeak-ng's clip cut right after its last audible sample (espeak pads the end with silence, which would
    otherwise count as the user's speech)."""
    from qwen_omni.speech.offline_voice import synthesize

    x = synthesize(text)
    loud = np.flatnonzero(np.abs(x) > 0.02)
    return x[:loud[-1] + 1] if loud.size else x


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def realtime_turn(url: str, model: str, voice: np.ndarray, silence_ms: int) -> float:
    from websockets.sync.client import connect

    lead = np.zeros(int(0.3 * RATE), np.float32)
    audio = np.concatenate([lead, voice])
    speech_end = audio.size
    with connect(url.replace("http://", "ws://") + f"/v1/realtime?model={model}", max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}}}))
        assert json.loads(ws.recv())["type"] == "session.updated"
        t_start = time.perf_counter()
        sent, t_end = 0, None
        silence = np.zeros(FRAME, np.float32)
        while True:  # real-time pacing: frame k leaves at t_start + k * 20 ms
            frame = audio[sent:sent + FRAME] if sent < audio.size else silence
            wait = t_start + sent / RATE - time.perf_counter()
            if wait > 0:
                try:
                    ev = json.loads(ws.recv(timeout=wait))
                    if ev["type"] == "response.output_audio.delta":
                        return time.perf_counter() - t_end
                    if ev["type"] == "error":
                        raise RuntimeError(ev["error"]["message"])
                except TimeoutError:
                    pass
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(frame)).decode()}))
            sent += FRAME
            if t_end is None and sent >= speech_end:
                t_end = time.perf_counter()
            if sent > audio.size + 10 * RATE:
                raise RuntimeError("no reply audio within 10 s of the end of speech")


def upload_turn(client: httpx.Client, url: str, model: str, voice: np.ndarray) -> float:
    from qwen_omni.speech.offline_voice import wav_bytes

    wav = wav_bytes(np.concatenate([np.zeros(int(0.3 * RATE), np.float32), voice]), RATE)
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": 64, "modalities": ["text", "audio"],
            "audio": {"format": "pcm16"}, "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]}]}
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices") or []:
                if (ch.get("delta") or {}).get("audio", {}).get("data"):
                    return time.perf_counter() - t0
    raise RuntimeError("no audio in the reply")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "assets" / "tiny-omni"))
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--silence-ms", type=int, default=600, help="server VAD: silence that ends a turn")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = ap.parse_args()

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen_omni", "serve", "--model", args.model, "--port", str(port),
                             "--threads", str(args.threads), "--log-level", "warning"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        voices = [speech(q) for q in QUESTIONS]
        client = httpx.Client(timeout=60)
        upload_turn(client, url, model, voices[0])  # warm-up (first audio decode, espeak, VAD model load)
        realtime_turn(url, model, voices[0], args.silence_ms)
        rt, up = [], []
        for i in range(args.turns):
            v = voices[i % len(voices)]
            rt.append(realtime_turn(url, model, v, args.silence_ms))
            up.append(upload_turn(client, url, model, v))
            print(f"turn {i + 1}: realtime {rt[-1] * 1000:.0f} ms, upload+chat {up[-1] * 1000:.0f} ms", flush=True)
        print(f"\nCPU: {cpu_info()}; server torch threads {args.threads}; VAD silence {args.silence_ms} ms")
        print(f"end of speech -> first reply audio, median of {args.turns} turns:")
        print(f"  realtime (WS, server VAD):      {statistics.median(rt) * 1000:.0f} ms "
              f"(min {min(rt) * 1000:.0f}, max {max(rt) * 1000:.0f})")
        print(f"  upload then chat completions:   {statistics.median(up) * 1000:.0f} ms "
              f"(min {min(up) * 1000:.0f}, max {max(up) * 1000:.0f})")
        print(f"  target: first audio within 1000 ms on the embedded model: "
              f"{'met' if statistics.median(rt) <= 1.0 else 'NOT met'}")
    finally:
        proc.terminate()
        proc.wait(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
