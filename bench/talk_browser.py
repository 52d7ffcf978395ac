"""Talk mode latency in a real browser: end of speech -> first reply audio playing, on the embedded model.

    python bench/talk_browser.py [--turns 10] [--model PATH]

Starts the app (`app.main`, the embedded assets/tiny-omni unless --model), opens it in Debian's Chromium and
replaces the page's microphone with a Web Audio stream (tests/test_talk.py's FAKE_MIC), so the bench knows on the page's own clock when each
spoken question (espeak-ng, "which word do you hear?") ends: the time of its last audible sample. The reply is
timed when the Talk tab's player fires `playing`, i.e. when its first audio is actually played, after the server's
end-of-utterance silence (the endpointer's 600 ms), the model's reply and the HLS stream's transport. Each turn
starts once the previous one is back to "listening". Prints every turn, the median, the server-side
end-of-speech -> first audio from each reply's stats line for comparison, and the CPU (model, cores, flags from
/proc/cpuinfo). Needs chromium, ffmpeg and espeak-ng.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = set((re.search(r"flags\s*:\s*(.*)", info) or [None, ""])[1].split())
    wanted = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
              if f in flags]
    return f"{model.group(1) if model else 'unknown CPU'}, {os.cpu_count()} cores, flags: {' '.join(wanted)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    import app
    from playwright.sync_api import sync_playwright

    from tests.test_talk import FAKE_MIC, open_talk, question_b64, start_mic

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.main(["--port", str(port), "--max-new-tokens", "32", *(["--model", args.model] if args.model else [])],
                    block=False)
    wav_b64, speech_end = question_b64()
    lat, server = [], []
    try:
        with sync_playwright() as p:
            browser, page = open_talk(p, f"http://127.0.0.1:{port}/", None, init_script=FAKE_MIC)
            start_mic(page)
            state = page.locator("#qo-talk-state textarea")
            deadline = time.monotonic() + 30
            while "listening" not in state.input_value() and time.monotonic() < deadline:
                time.sleep(0.05)
            bots = page.locator('#qo-chat [data-testid="bot"]').filter(has_text="end of speech")
            for turn in range(args.turns + 1):  # turn 0 warms the model, the voice and the player up
                time.sleep(1.0)
                page.evaluate("([b, e]) => window.__talk.say(b, e)", [wav_b64, speech_end])
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    t = page.evaluate("() => window.__talk")
                    end = t["ends"][-1] if t["ends"] else None
                    plays = [x for x in t["plays"] if end is not None and x > end]
                    if plays and bots.count() >= turn + 1 and "listening" in state.input_value():
                        break
                    time.sleep(0.05)
                else:
                    raise SystemExit(f"turn {turn}: no reply played within 30 s (state {state.input_value()!r})")
                text = bots.nth(turn).inner_text()
                srv = float(re.search(r"end of speech → first audio ([0-9.]+) s", text).group(1))
                ms = plays[0] - end
                if turn:
                    lat.append(ms / 1000)
                    server.append(srv)
                print(f"turn {turn}{' (warm-up)' if not turn else ''}: end of speech -> first audio playing "
                      f"{ms / 1000:.2f} s in the browser ({srv:.2f} s on the server)", flush=True)
            browser.close()
    finally:
        demo.close()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{cpu_line()}; torch threads {__import__('torch').get_num_threads()}; load average {load}")
    print(f"end of speech -> first reply audio in the browser, median of {len(lat)} turns: "
          f"{statistics.median(lat):.2f} s (min {min(lat):.2f}, max {max(lat):.2f}); "
          f"server-side median {statistics.median(server):.2f} s; target <= 1.5 s")


if __name__ == "__main__":
    main()
