"""Rollout workers: engines in their own processes, feeding the learner (docs/rollout.md#rollout-workers).

    learner process (WorkerPool, one per learner rank)        worker process k (its own engine)
    ---------------------------------------------------       ---------------------------------
    submit(request)  -> worker k's request queue               main thread: before each engine call,
    results()        <- the shared results queue                 load the weights staged so far; then
    load_weights()   -> per bucket: its names on worker k's      generate the request's prompts and
                        weight queue, its bytes over the         put the samples on the results queue
                        (learner, worker k) gloo group         receiver thread: receives every bucket
                                                                 as it comes (generation goes on), and
                                                                 stages a version once complete

So a weight update never waits for a generation to end: a worker receives it while it generates and
applies it between two engine calls; a request that was running finishes with the weights it
started with, and its tokens carry that version (Sample.versions), which is what the learner's
staleness bound reads. Every wait on a worker has a limit (`timeout_s`) and a message naming the
worker; a dead worker is noticed within a second (is_alive polled while waiting).

The pool is also a RolloutEngine (generate / load_weights / version), so the trainer, the evaluator
and CurES's difficulty pass use it unchanged: `generate` is a request to worker 0, waited for.
Requests carry their own seed (SamplingParams.seed), so what a worker samples does not depend on
which worker or when: with one worker and max_staleness 0 a run is the colocated run with
`rollout.seed_requests: true`, bit for bit (tests/test_workers.py).
"""
from __future__ import annotations

import datetime
import itertools
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from rollout.types import Sample, SamplingParams, UserError

BUCKET_BYTES = 64 * 2 ** 20  # weights go over in flat buckets of at most this many bytes
MAX_RESTARTS = 3  # restart_workers: a run whose workers keep failing stops after this many restarts


class WorkerFailure(RuntimeError):
    """A rollout worker died, hung or failed: one line naming it."""


@dataclass
class WorkerSpec:
    """What a worker process needs to build its engine (all picklable)."""
    kind: str                      # hf | vllm | auto
    model: str                     # the model spec the learner started from
    device: str = "cpu"
    threads: int | None = None     # torch threads in the worker (CPU); None: torch's default
    engine_kwargs: dict = field(default_factory=dict)
    seed: int = 0


def _group(store, rank: int, prefix: str, timeout_s: float):
    """A two-member gloo group (learner = 0, worker = 1) on loopback, outside any default group."""
    import torch.distributed as dist
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, options)


def _store(port: int | None, timeout_s: float):
    import torch.distributed as dist
    timeout = datetime.timedelta(seconds=timeout_s)
    if port is None:
        return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)


# --- the worker process ---------------------------------------------------------------------------

def worker_main(index: int, spec: WorkerSpec, port: int, prefix: str, requests, weights, results,
                timeout_s: float) -> None:
    """A worker's whole life: build the engine, say ready, serve requests until told to stop."""
    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        from rollout.engine import make_engine
        from rollout.models import load_tokenizer
        tokenizer = load_tokenizer(spec.model)
        engine = make_engine(spec.kind, spec.model, tokenizer, spec.device, seed=spec.seed, **spec.engine_kwargs)
        results.put(("ready", index, os.getpid()))  # the learner then joins the group on its side
        group = _group(_store(port, timeout_s), 1, prefix, timeout_s)
    except Exception as e:  # noqa: BLE001 - reported to the learner as one line
        results.put(("error", index, f"could not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return
    staged: list[tuple[int, list[tuple[str, torch.Tensor]]]] = []
    lock = threading.Lock()
    receiver = threading.Thread(target=_receive_weights, args=(group, weights, staged, lock, results, index),
                                daemon=True)
    receiver.start()

    def apply_staged():  # between engine calls: every version staged so far, in order
        with lock:
            updates, staged[:] = list(staged), []
        for version, named in updates:
            engine.load_weights(named, version)

    streams: set[str] = set()  # APRIL's requests running in the engine (add / step / abort)
    while True:
        try:
            message = requests.get(block=not streams)  # while streams run: only what has come already
        except queue.Empty:
            message = None
        try:
            if message is None:
                apply_staged()
                for request_id, sample in engine.step():
                    streams.discard(request_id)
                    results.put(("streamed", index, request_id, sample))
                continue
            kind, request_id = message[0], message[1] if len(message) > 1 else None
            if kind == "stop":
                break
            apply_staged()
            if kind == "generate":
                results.put(("done", index, request_id, engine.generate(*message[2:])))
            elif kind == "add":
                engine.add_request(request_id, *message[2:])
                streams.add(request_id)
            elif kind == "abort":  # one that finished already was sent as streamed: None says so
                sample = engine.abort(request_id) if request_id in streams else None
                streams.discard(request_id)
                results.put(("aborted", index, request_id, sample))
        except Exception as e:  # noqa: BLE001
            results.put(("error", index, f"request {request_id} failed: {type(e).__name__}: {e}"))
            return


def _receive_weights(group, weights, staged: list, lock: threading.Lock, results, index: int) -> None:
    """Bucket by bucket as the learner sends them; a version is staged once its last bucket is in."""
    named: list[tuple[str, torch.Tensor]] = []
    try:
        while True:
            message = weights.get()
            if message[0] == "stop":
                return
            _, version, entries, dtype, numel, last = message
            flat = torch.empty(numel, dtype=dtype)
            group.recv([flat], 0, 0).wait()
            offset = 0
            for name, shape in entries:
                size = int(torch.Size(shape).numel())
                named.append((name, flat[offset:offset + size].view(shape)))
                offset += size
            if last:
                with lock:
                    staged.append((version, named))
                named = []
    except Exception as e:  # noqa: BLE001
        results.put(("error", index, f"weight transfer failed: {type(e).__name__}: {e}"))


# --- the learner's side ---------------------------------------------------------------------------

class _Worker:
    def __init__(self, pool: "WorkerPool", index: int, generation: int):
        ctx = multiprocessing.get_context("spawn")
        self.index, self.prefix = index, f"worker{index}-{generation}"
        self.requests, self.weights = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=worker_main, daemon=True, name=f"rlpost-rollout-{index}", args=(
            index, pool.specs[index], pool.store.port, self.prefix, self.requests, self.weights, pool.results_queue,
            pool.timeout_s))
        self.process.start()
        self.ready = False         # its engine is built
        self.group = None          # connected once the worker is up (the constructor waits for both sides)
        self.pending: dict[int, tuple] = {}  # request id -> the request, until its result comes back
        self.streams: dict[str, tuple] = {}  # APRIL's streamed requests: id -> (prompt ids, params)
        self.last_heard = time.time()

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.streams)


class WorkerPool:
    """K rollout worker processes (one engine each) and their weight channels; a RolloutEngine."""

    def __init__(self, specs: list[WorkerSpec], *, timeout_s: float = 600.0, restart: bool = False):
        self.specs, self.timeout_s, self.restart = specs, timeout_s, restart
        self.version = 0
        self.store = _store(None, timeout_s)
        self.results_queue = multiprocessing.get_context("spawn").Queue()
        self._ids = itertools.count()
        self._done: dict[int, list[Sample]] = {}
        self._generation = itertools.count()
        self._last_weights: list[tuple] | None = None  # what a restarted worker gets (restart=True only)
        self._sending: list[tuple] | None = None  # during load_weights (restart=True): the buckets sent so far
        self.sync_bytes = 0
        self._restarts = 0
        self._streamed: dict[str, Sample] = {}  # streamed requests finished or aborted, not handed out yet
        self._aborted: set[str] = set()         # their abort was answered
        self._aborting: set[str] = set()
        self.workers = [self._start(k) for k in range(len(specs))]
        for worker in self.workers:
            self._wait_ready(worker)

    # -- lifecycle -------------------------------------------------------------------------------
    def _start(self, index: int) -> _Worker:
        return _Worker(self, index, next(self._generation))

    def _wait_ready(self, worker: _Worker) -> None:
        """Until the worker has built its engine (its "ready" may already have come), then join the
        worker's gloo group (the worker joins it right after saying ready)."""
        deadline = time.time() + self.timeout_s
        while not worker.ready:
            self._handle(self._next_message(deadline, f"rollout worker {worker.index} did not start"))
        worker.group = _group(self.store, 0, worker.prefix, self.timeout_s)
        worker.last_heard = time.time()

    def close(self) -> None:
        for worker in self.workers:
            for channel in (worker.requests, worker.weights):
                try:
                    channel.put(("stop",))
                except (OSError, ValueError):
                    pass
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams, worker: int) -> int:
        """Queue a request on worker `worker`; returns its id (its samples come back from `take`)."""
        request_id = next(self._ids)
        target = self.workers[worker]
        if not target.busy:
            target.last_heard = time.time()  # the hang clock runs while a worker has work
        target.pending[request_id] = (prompts, params)
        target.requests.put(("generate", request_id, prompts, params))
        return request_id

    def take(self, request_ids: Iterable[int], block: bool = True) -> dict[int, list[Sample]]:
        """The finished ones among `request_ids` (all of them when `block`: waits, within limits)."""
        wanted = set(request_ids)
        while block and not wanted <= set(self._done):
            self._handle(self._next_message(None, None))
        self._drain()
        return {i: self._done.pop(i) for i in list(wanted) if i in self._done}

    def wait_any(self, request_ids: Iterable[int]) -> None:
        """Until at least one of `request_ids` is finished."""
        wanted = set(request_ids)
        while not wanted & set(self._done):
            self._handle(self._next_message(None, None))

    def _drain(self) -> None:
        while True:
            try:
                self._handle(self.results_queue.get_nowait())
            except queue.Empty:
                return

    def _next_message(self, deadline: float | None, what: str | None):
        """The next message from any worker; meanwhile every second: is each worker alive, and has a
        worker with pending work been silent past timeout_s?"""
        while True:
            try:
                return self.results_queue.get(timeout=1.0)
            except queue.Empty:
                pass
            now = time.time()
            if deadline is not None and now > deadline:
                raise WorkerFailure(f"{what} within rollout.worker_timeout_s={self.timeout_s:g} s")
            for worker in self.workers:
                if not worker.process.is_alive():
                    self._failed(worker, f"died (exit code {worker.process.exitcode})")
                elif worker.busy and now - worker.last_heard > self.timeout_s:
                    worker.process.kill()
                    worker.process.join(timeout=10)
                    self._failed(worker, f"gave no result for {now - worker.last_heard:.0f} s "
                                         f"(rollout.worker_timeout_s={self.timeout_s:g}); killed it")

    def _handle(self, message) -> None:
        kind, index = message[0], message[1]
        worker = self.workers[index] if index < len(getattr(self, "workers", [])) else None
        if kind == "ready":
            if worker is not None and worker.process.pid == message[2]:
                worker.ready = True
        elif kind == "done":
            _, _, request_id, samples = message
            if worker is not None and request_id in worker.pending:
                del worker.pending[request_id]
                worker.last_heard = time.time()
                self._done[request_id] = samples
        elif kind in ("streamed", "aborted"):
            _, _, request_id, sample = message
            if worker is not None and request_id in worker.streams:
                del worker.streams[request_id]
                worker.last_heard = time.time()
                if sample is not None:
                    self._streamed[request_id] = sample
            if kind == "aborted":
                self._aborted.add(request_id)
        elif kind == "error":
            if worker is None:
                raise WorkerFailure(f"rollout worker {index} {message[2]}")
            worker.process.kill()
            worker.process.join(timeout=10)
            self._failed(worker, message[2])

    def _failed(self, worker: _Worker, why: str) -> None:
        """Stop the run with one line, or (restart) start the worker afresh with the latest weights
        and its pending requests again."""
        self._restarts += 1
        if not self.restart or self._restarts > MAX_RESTARTS:
            again = f" (restarted {MAX_RESTARTS} times already)" if self.restart else ""
            raise WorkerFailure(f"rollout worker {worker.index} (pid {worker.process.pid}) {why}{again}")
        pending = list(worker.pending.items())
        fresh = self._start(worker.index)
        self.workers[worker.index] = fresh
        self._wait_ready(fresh)
        for bucket, flat in (self._last_weights or []) + (self._sending or []):  # the latest version so far
            self._send_bucket(fresh, bucket, flat)
        for request_id, (prompts, params) in pending:  # the same ids: whoever waits for them still does
            fresh.pending[request_id] = (prompts, params)
            fresh.requests.put(("generate", request_id, prompts, params))
        for request_id, (prompt_ids, params) in worker.streams.items():  # from their start: nothing came back
            fresh.streams[request_id] = (prompt_ids, params)
            fresh.requests.put(("add", request_id, prompt_ids, params))
            if request_id in self._aborting:
                fresh.requests.put(("abort", request_id))
        fresh.last_heard = time.time()

    # -- StreamingEngine (APRIL on the workers' side) ---------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """A streamed request on the worker with the fewest: it generates it step by step from now on,
        taking weight updates between its engine steps (later tokens carry the newer version)."""
        worker = min(self.workers, key=lambda w: len(w.streams))
        if not worker.busy:
            worker.last_heard = time.time()
        worker.streams[request_id] = (list(prompt_ids), params)
        worker.requests.put(("add", request_id, list(prompt_ids), params))

    def step(self) -> list[tuple[str, Sample]]:
        """The streamed requests finished since the last call; waits (within limits) for one when none
        has finished yet and some are running."""
        self._drain()
        if not self._streamed and any(w.streams for w in self.workers):
            self._handle(self._next_message(None, None))
            self._drain()
        finished = [(i, s) for i, s in self._streamed.items() if i not in self._aborting]
        for request_id, _ in finished:
            del self._streamed[request_id]
        return finished

    def abort(self, request_id: str) -> Sample:
        """Stop a streamed request; what it generated so far (or all of it, if it finished meanwhile)."""
        if request_id in self._streamed:
            return self._streamed.pop(request_id)
        worker = next(w for w in self.workers if request_id in w.streams)
        self._aborting.add(request_id)
        worker.requests.put(("abort", request_id))
        while request_id not in self._aborted:
            self._handle(self._next_message(None, None))
        self._aborting.discard(request_id)
        self._aborted.discard(request_id)
        return self._streamed.pop(request_id)

    # -- RolloutEngine -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One request to worker 0, waited for (eval, CurES's difficulty pass)."""
        request_id = self.submit(prompts, params, 0)
        return self.take([request_id])[request_id]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Every tensor to every worker, bucket by bucket as the iterator yields them (under ZeRO-3 the
        learner gathers one bucket at a time); the workers apply them between engine calls."""
        kept = self._sending = [] if self.restart else None
        entries, tensors, size, dtype = [], [], 0, None

        def flush(last: bool):
            nonlocal entries, tensors, size
            if not tensors and not last:
                return
            flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0, dtype=dtype or torch.float32)
            bucket = ("bucket", version, entries, flat.dtype, flat.numel(), last)
            for worker in self.workers:
                self._send_bucket(worker, bucket, flat)
            self.sync_bytes += flat.numel() * flat.element_size() * len(self.workers)
            if kept is not None:
                kept.append((bucket, flat))
            entries, tensors, size = [], [], 0

        self.sync_bytes = 0
        try:
            for name, tensor in named_tensors:
                tensor = tensor.detach().to("cpu", copy=True).contiguous()
                if tensors and (tensor.dtype != dtype or size + tensor.numel() * tensor.element_size() > BUCKET_BYTES):
                    flush(False)
                dtype = tensor.dtype
                entries.append((name, tuple(tensor.shape)))
                tensors.append(tensor)
                size += tensor.numel() * tensor.element_size()
            flush(True)
        finally:
            self._sending = None
        if kept is not None:
            self._last_weights = self._merge_kept(kept)
        self.version = version

    def _merge_kept(self, kept: list) -> list:
        """The latest full picture for a restarted worker: a partial sync (LoRA's adapted modules)
        replaces only its own names in what was kept before."""
        if self._last_weights is None:
            return kept
        names = {name for (bucket, _) in kept for name, _ in bucket[2]}
        old = [(b, f) for b, f in self._last_weights if not names & {n for n, _ in b[2]}]
        return [(("bucket", b[1], b[2], b[3], b[4], False), f) for b, f in old] + kept

    def _send_bucket(self, worker: _Worker, bucket: tuple, flat: torch.Tensor) -> None:
        """One bucket to one worker. A worker that is dead, or does not take it within timeout_s (hung),
        fails (_failed); when it is restarted, the fresh one gets the latest full picture, the buckets
        of this version sent so far, and then this one, so it never stages a mix of two versions."""
        if not worker.process.is_alive():
            why = f"died (exit code {worker.process.exitcode})"
        else:
            worker.weights.put(bucket)
            try:
                worker.group.send([flat], 1, 0).wait()
                return
            except RuntimeError as e:
                worker.process.kill()
                worker.process.join(timeout=10)
                why = (f"did not take the weights (version {bucket[1]}) within rollout.worker_timeout_s="
                       f"{self.timeout_s:g} s ({str(e).splitlines()[0][:120]}); killed it")
        self._failed(worker, why)
        self._send_bucket(self.workers[worker.index], bucket, flat)


def worker_specs(kind: str, model: str, devices: list[str] | None, count: int, threads: int | None,
                 engine_kwargs: dict, seed: int) -> list[WorkerSpec]:
    devices = devices or ["cpu"] * count
    if len(devices) != count:
        raise UserError(f"rollout.worker_devices names {len(devices)} devices for rollout.workers={count}")
    return [WorkerSpec(kind, model, device, threads, engine_kwargs, seed + k) for k, device in enumerate(devices)]
