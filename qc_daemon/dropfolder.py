"""The drop folder: DICOM files copied into a folder enter through the same intake as received instances.

watchdog reports new files; a file is read once its size has stayed the same for ``settle_s`` (a copy in
progress is not read half-written). Spooled files are removed from the drop folder; files that cannot be
ingested move to ``<folder>/rejected/`` with a ``.reason.txt`` beside them. Nothing is lost either way.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from qc_daemon.intake import InstanceRejected, Intake
from qc_daemon.logs import get_logger

log = get_logger(__name__)
REJECTED = "rejected"


class _Events(FileSystemEventHandler):
    def __init__(self, seen: dict[Path, tuple[float, int]], lock: threading.Lock):
        self.seen, self.lock = seen, lock

    def on_created(self, event: FileSystemEvent) -> None:
        self._note(event.src_path, event.is_directory)

    def on_modified(self, event: FileSystemEvent) -> None:
        self._note(event.src_path, event.is_directory)

    def on_moved(self, event: FileSystemEvent) -> None:
        self._note(event.dest_path, event.is_directory)

    def _note(self, path: str | bytes, is_directory: bool) -> None:
        if is_directory:
            return
        with self.lock:
            self.seen[Path(str(path))] = (time.monotonic(), -1)


class DropFolder:
    def __init__(self, folder: Path, intake: Intake, settle_s: float, poll_s: float = 0.5):
        self.folder = folder
        self.intake = intake
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seen: dict[Path, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._observer = Observer()
        self._observer.schedule(_Events(self._seen, self._lock), str(folder), recursive=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qc-dropfolder", daemon=True)

    def start(self) -> None:
        # Files already there (dropped while the daemon was down) are ingested too.
        with self._lock:
            for path in self.folder.rglob("*"):
                if path.is_file() and not self._is_rejected(path):
                    self._seen[path] = (time.monotonic(), -1)
        self._observer.start()
        self._thread.start()
        log.info("drop_folder_watching", folder=str(self.folder))

    def stop(self) -> None:
        self._stop.set()
        self._observer.stop()
        self._observer.join()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self._settled():
                self.ingest(path)
            self._stop.wait(self.poll_s)

    def _settled(self) -> list[Path]:
        ready, now = [], time.monotonic()
        with self._lock:
            for path, (since, size) in list(self._seen.items()):
                try:
                    current = path.stat().st_size
                except FileNotFoundError:
                    del self._seen[path]
                    continue
                if self._is_rejected(path):
                    del self._seen[path]
                elif current != size:
                    self._seen[path] = (now, current)
                elif now - since >= self.settle_s:
                    del self._seen[path]
                    ready.append(path)
        return ready

    def _is_rejected(self, path: Path) -> bool:
        return REJECTED in path.relative_to(self.folder).parts

    def ingest(self, path: Path) -> bool:
        """Spool one dropped file; True when it was spooled (or already was) and removed from the folder."""
        try:
            self.intake.accept_file(path)
        except InstanceRejected as exc:
            self._reject(path, exc.reason)
            return False
        except Exception as exc:  # noqa: BLE001 - an unreadable file is rejected, never a crash
            self._reject(path, f"not a readable DICOM file: {type(exc).__name__}: {exc}"[:300])
            return False
        path.unlink(missing_ok=True)
        return True

    def _reject(self, path: Path, reason: str) -> None:
        target_dir = self.folder / REJECTED
        target_dir.mkdir(exist_ok=True)
        target = target_dir / path.name
        try:
            path.replace(target)
            target.with_name(target.name + ".reason.txt").write_text(reason + "\n")
        except OSError:
            pass
        log.warning("dropped_file_rejected", file=path.name, reason=reason)
