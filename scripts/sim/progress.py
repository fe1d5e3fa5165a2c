"""Log text shaped like a diffusion model's: seed, prompt, tqdm progress bars, tracebacks."""

from __future__ import annotations

PARTIAL = " ▏▎▍▌▋▊▉"
BAR_WIDTH = 10


def header(seed: int, prompt: str) -> str:
    return f"Using seed: {seed}\nPrompt: {prompt}\ntxt2img mode\n"


def _bar(done: int, total: int) -> str:
    eighths = done * BAR_WIDTH * 8 // total
    full, part = divmod(eighths, 8)
    text = "█" * full + (PARTIAL[part] if part and full < BAR_WIDTH else "")
    return text.ljust(BAR_WIDTH)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def progress_line(done: int, total: int, rate: float) -> str:
    """One tqdm line, e.g. ' 10%|█         | 5/50 [00:01<00:09,  4.91it/s]'."""
    if done == 0:
        return f"  0%|{' ' * BAR_WIDTH}| 0/{total} [00:00<?, ?it/s]\n"
    percent = 100 * done // total
    elapsed, remaining = done / rate, (total - done) / rate
    return (f"{percent:3d}%|{_bar(done, total)}| {done}/{total} "
            f"[{_clock(elapsed)}<{_clock(remaining)}, {rate:5.2f}it/s]\n")


def traceback(error: str) -> str:
    """A cog worker traceback ending in the prediction's error, as failed predictions log."""
    return (
        "Traceback (most recent call last):\n"
        '  File "/usr/local/lib/python3.12/site-packages/cog/server/worker.py", line 243, '
        "in _handle_predict_error\n    yield\n"
        '  File "/usr/local/lib/python3.12/site-packages/cog/server/worker.py", line 282, '
        "in _predict\n    result = predict(**payload)\n             ^^^^^^^^^^^^^^^^^^\n"
        '  File "/src/predict.py", line 178, in predict\n'
        "    raise RuntimeError(error)\n"
        f"RuntimeError: {error}\n"
    )
