"""A disk cache of judge verdicts, so a rerun pays for no judgment twice.

The key hashes (judge, instruction, the two outputs as shown, the order): a different judge model,
prompt protocol, output text or output order is a different question and a fresh call. The file is
JSON lines, appended one verdict at a time as calls finish, so an interrupted run keeps what it paid
for; a torn last line (a crash mid-write) is skipped on load.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path


def judgment_key(judge: str, instruction: str, first: str, second: str, switched: bool) -> str:
    payload = json.dumps([judge, instruction, first, second, bool(switched)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.entries[entry["key"]] = entry["value"]

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self.entries[key] = value
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
