"""Publisher: adapter version → every policy server → verified → announced on the queue.

    check : before step 1, each server's /version and LoRA limits (`simkit.modelserver.info`): a LoRA
            config it would refuse stops the run before any training; then `reload_current`: a
            server that lost the queue's current version (restarted: it starts without adapters)
            gets it again from the path the version was published with
    save  : copy the checkpoint's adapter into adapters/{run_id}/vNNNNNN/ (a NEW directory per
            version and per run: vLLM keys its prefix cache and adapter registry by name and path,
            so a run redone into the same folder must not reuse the last run's names)
    load  : POST {url}/load_lora_adapter {lora_name, lora_path, load_inplace} on every server,
            with retries on transient failures (502/503/504/429/timeouts); a refusal (4xx, or
            vLLM's 500 for an adapter it cannot serve) is `PublishRejected`, never retried
    verify: GET {url}/models lists the name with root == lora_path
    publish: queue.publish_version(version, adapter=name, path) — only now does serve switch.

The HTTP calls go through simkit's transport (`get_json` / `post_json`), the same stack the
role clients use, with the bearer token and timeouts handled there. The trainer is synchronous,
so the publisher keeps one private event loop for them (keep-alive connections are reused).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simkit.modelserver import info as server_info
from simkit.modelserver.info import AdapterLoadError, AdapterRefused, AdapterRejected, load_adapter
from simkit.roles.transport import ChatTransport, TransportError, make_transport

log = logging.getLogger("trainer")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


# the load itself and its errors live with the server's client side (simkit.modelserver.info), so
# every caller (this publisher, serve's follower, the demo) loads an adapter the same way
PublishError, PublishRefused, PublishRejected = AdapterLoadError, AdapterRefused, AdapterRejected


@dataclass
class PublishResult:
    version: int
    adapter: str
    path: str
    servers: list[str]
    save_s: float
    load_s: float
    merged_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.save_s + self.load_s


class Publisher:
    def __init__(self, queue, policy_urls: list[str], adapters_dir: str | Path, *, adapter_name: str = "policy",
                 naming: str = "versioned", keep_loaded: int = 0, retries: int = 5, timeout_s: float = 60.0,
                 api_key: str | None = None, merge_base: str | None = None, merge_dtype: str = "auto",
                 backoff_s: float = 0.5, transport: ChatTransport | None = None, run_id: str | None = None):
        self.queue = queue
        self.run_id = run_id  # makes names and paths unique per run (None: the old {name}-vN, vNNNNNN)
        self.urls = [u.rstrip("/") for u in policy_urls]
        self.adapters_dir = Path(adapters_dir)
        self.adapter_name, self.naming, self.keep_loaded = adapter_name, naming, keep_loaded
        self.retries, self.backoff_s = retries, backoff_s
        self.merge_base, self.merge_dtype = merge_base, merge_dtype
        self.timeout_s = timeout_s
        self.transport = transport or make_transport("fast", api_key)
        self._loop = asyncio.Runner()

    def close(self) -> None:
        self._loop.run(self.transport.aclose())
        self._loop.close()

    def _get(self, url: str, path: str) -> Any:
        return self._loop.run(self.transport.get_json(url, path, self.timeout_s))

    def _post(self, url: str, path: str, payload: dict[str, Any]) -> Any:
        return self._loop.run(self.transport.post_json(url, path, payload, self.timeout_s))

    def name_for(self, version: int) -> str:
        if self.naming != "versioned":
            return self.adapter_name
        run = f"-{self.run_id}" if self.run_id else ""
        return f"{self.adapter_name}{run}-v{version}"

    def dir_for(self, version: int) -> Path:
        base = self.adapters_dir / self.run_id if self.run_id else self.adapters_dir
        return base / f"v{version:06d}"

    def check_servers(self, rank: int, target_modules: list[str]) -> list[str]:
        """Before training: each server's version and LoRA limits. Raises PublishRejected when a
        server would refuse this run's adapters; returns warnings (logged) otherwise."""
        warnings, problems = [], []
        for url in self.urls:
            try:
                version = server_info.vllm_version(
                    self._loop.run(self.transport.get_json(server_info.root_url(url), "/version", self.timeout_s)))
            except TransportError:
                version = None  # no /version (an old server or a proxy): nothing version-specific to say
            warnings += [f"{url}: {w}" for w in server_info.version_warnings(version, self.naming != "versioned")]
            try:
                cards = self.listed(url)
            except (TransportError, PublishError) as e:
                warnings.append(f"{url}: could not read its model list before training ({e}); loads will retry")
                continue
            base = next((c for c in cards.values() if not c.get("parent")), {})
            problems += [f"{url}: {p}" for p in server_info.lora_problems(base, rank, target_modules)]
            hint = server_info.rank_hint(base, rank)
            if hint:
                warnings.append(f"{url}: {hint}")
        for w in warnings:
            log.warning("%s", w)
        if problems:
            raise PublishRejected("the policy server would refuse this run's adapters: " + "; ".join(problems))
        self.reload_current()
        return warnings

    def reload_current(self) -> list[str]:
        """Load the queue's current version again into every server that does not list it (a
        restarted server has no adapters; serve's episodes fail on it until someone reloads, and
        the next publish may be far off, or never come). Never fatal: failures are logged.
        Returns the URLs it reloaded."""
        cur = self.queue.current_version()
        if cur is None or not cur.path or not (Path(cur.path) / "adapter_config.json").is_file():
            return []
        done = []
        for url in self.urls:
            try:
                if cur.adapter in self.listed(url):
                    continue
                self.load(url, cur.adapter, Path(cur.path))
            except (PublishError, TransportError, ValueError, KeyError) as e:
                log.warning("%s lacks the current version v%d (%s) and reloading it failed: %s", url, cur.version,
                            cur.adapter, e)
                continue
            log.warning("%s had lost the current version v%d (%s): loaded it again from %s", url, cur.version,
                        cur.adapter, cur.path)
            done.append(url)
        return done

    def next_version(self) -> int:
        cur = self.queue.current_version()
        return 1 if cur is None else cur.version + 1

    # ------------------------------------------------------------------ steps
    def save(self, src_dir: str | Path, version: int) -> Path:
        """Copy the adapter files into a fresh per-version directory (atomically renamed)."""
        src = Path(src_dir)
        if not (src / "adapter_config.json").is_file():
            raise PublishError(f"{src} holds no adapter (adapter_config.json missing)")
        dst = self.dir_for(version)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ADAPTER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if dst.exists():  # re-publishing the same version after a crash: same weights, fresh copy
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        return dst.resolve()

    def listed(self, url: str) -> dict[str, dict]:
        return self._loop.run(server_info.listed_adapters(self.transport, url, self.timeout_s))

    def load(self, url: str, name: str, path: Path) -> None:
        """Load (or reload in place) `name` from `path` on one server and verify it is listed,
        retrying transient failures; a refusal is raised at once."""
        err: Exception | None = None
        for attempt in range(1, self.retries + 1):
            try:
                return self._loop.run(load_adapter(self.transport, url, name, path, self.timeout_s))
            except PublishRefused:
                raise
            except (PublishError, TransportError, ValueError, KeyError) as e:
                err = e
            log.warning("loading %s into %s failed (attempt %d/%d): %s", name, url, attempt, self.retries, err)
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise PublishError(f"could not load {name} into {url} after {self.retries} attempts: {err}")

    def unload_old(self, version: int) -> None:
        if self.naming != "versioned" or self.keep_loaded <= 0:
            return
        old = version - self.keep_loaded
        if old < 1:
            return
        for url in self.urls:
            try:
                self._post(url, "/unload_lora_adapter", {"lora_name": self.name_for(old)})
            except TransportError as e:
                log.warning("unloading %s from %s failed: %s", self.name_for(old), url, e)

    # ------------------------------------------------------------------ all of it
    def publish(self, src_dir: str | Path, version: int | None = None, meta: dict[str, Any] | None = None
                ) -> PublishResult:
        version = self.next_version() if version is None else version
        name = self.name_for(version)
        t0 = time.perf_counter()
        path = self.save(src_dir, version)
        merged = None
        if self.merge_base:
            from .models import merge_adapter

            merged = str(merge_adapter(self.merge_base, path, path.with_name(path.name + "-merged"), self.merge_dtype))
        t1 = time.perf_counter()
        for url in self.urls:
            self.load(url, name, path)
        self.queue.publish_version(version, name, str(path),
                                   meta={**(meta or {}), "servers": self.urls, "merged_path": merged})
        self.unload_old(version)
        res = PublishResult(version, name, str(path), list(self.urls), t1 - t0, time.perf_counter() - t1, merged)
        log.info("published v%d (%s) in %.2fs: %s", version, name, res.total_s, path)
        return res
