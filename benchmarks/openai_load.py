"""Load test for the OpenAI-compatible API: many simultaneous `openai` clients on /v1/chat/completions.

The same measurement as `benchmarks/app_load.py` (baseline one request at a time, then
concurrent clients, every answer checked against its baseline answer) with the
official `openai` Python client instead of gradio_client; images travel as data: URIs.

    python benchmarks/openai_load.py [--url URL | --checkpoint DIR] [--clients 16] [--requests 4]
        [--sweep 1 4 16 64 --plot benchmarks/openai_load.png]
"""

from __future__ import annotations

import base64
import mimetypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app_load  # noqa: E402  (the sibling script's measurement)


class OpenAIAPI:
    """One client of the app's /v1/chat/completions."""

    def __init__(self, url: str):
        from openai import OpenAI

        self.client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.images: dict[str, str] = {}

    def caption(self, job, max_new_tokens: int) -> str:
        path, task = job
        if path not in self.images:
            media = mimetypes.guess_type(path)[0] or "image/png"
            self.images[path] = f"data:{media};base64," + base64.b64encode(Path(path).read_bytes()).decode()
        r = self.client.chat.completions.create(
            model="any", max_tokens=max_new_tokens,
            messages=[{"role": "user", "content": [{"type": "text", "text": task},
                                                   {"type": "image_url", "image_url": {"url": self.images[path]}}]}])
        return r.choices[0].message.content


if __name__ == "__main__":
    sys.exit(app_load.main(api=OpenAIAPI, name="openai_load"))
