"""
The run around Algorithm 1: everything distill.py's loop needs that is not the algorithm, behind one
object, `Run`. It holds no training logic: distill.py draws t, w and eps, forms x_t, the teacher's target,
the student's Eq. 7 forward, the loss, and takes the AdamW and EMA steps; a Run gives it its processes,
networks and data, and writes what the run leaves behind.

    with Run(args, dataset) as run:              # the arguments checked, ranks and device, --out's lock,
        if run.finished is not None:             #   the checkpoint to resume (a finished run: its path)
            return run.finished
        teacher, weak, main = run.load_teachers()       # frozen (W2SD: strong, weak and main models)
        model = run.load_student_start()                # the student's MMDiT: an fp32 copy, or LoRA adapters
        student = Student(model, fusion)                # (distill.py)
        ema = run.make_ema(student); run.shard(student, ema)           # --ema; --fsdp
        optimizer = AdamW(trainable(student)[1], ...)   # (distill.py)
        start = run.resume(student, ema, optimizer)     # the step to start from, its checkpoint loaded
        forward = run.data_parallel(student); null = run.null_prompt()
        batches = run.micro_batches(start, draw)        # run/batches.py's stream, on the device
        run.start_monitor(start, student, ema, null)    # sample grids, TensorBoard
        for step in run.steps(start):                   # a progress bar on rank 0
            ...                                         # Algorithm 1 (distill.py)
            loss = run.global_batch_loss(loss, step)    # all-reduced; a non-finite one stops the run
            run.check_weights(step + 1, student, ema, probe)  # finite, before a grid or a checkpoint
            run.record(step + 1, ...)                   # log.jsonl, sample grids, TensorBoard
            if run.checkpoint_due(step + 1):
                run.save_checkpoint(step + 1, student, ema, optimizer)
        return run.finish(student, ema)                 # the final files (run/final_files.py)

The pieces it puts together, one module each: run/options.py (the flags and their checks), run/cli.py
(error lines, --out's lock), run/training_state.py (checkpoints, resume, non-finite checks), run/parallel.py
(DDP and FSDP), run/batches.py (which samples every step draws), run/monitor.py (sample grids,
TensorBoard), run/final_files.py (the final files and relaunches), sd3/lora.py (LoRA students),
sd3/export.py (the model card and the diffusers export).

Processes. `python distill.py` runs one process; under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) one
process per GPU, NCCL on CUDA, gloo on the CPU, DDP around the student (--fsdp: sharded, run/parallel.py).
Rank 0 takes the lock, logs and saves; the loss is all-reduced before it is logged; torch is seeded
seed * world + rank (DiT), while Algorithm 1's own draws are counter-based (run/batches.py), so one process
and N processes compute the same step.

The networks. Without --teacher: the toy world of toy.py (its cached teacher, weak model and data). The
student starts from the network that makes the teacher step's final move: --teacher for cfg and zsampling;
for w2sd the strong model (--strong, default --teacher; Eq. 4), or with --w2sd-final main the main model
(--teacher). --w2sd-finetuned F builds the W2SD release's pair from a fine-tune of --teacher: strong =
teacher + 1.5 (F - teacher), weak = teacher - 1.5 (F - teacher), main = teacher + 0.8 (F - teacher)
(--strong-scale, --weak-scale, --main-scale), read tensor by tensor (mmdit.load_mmdit_blend), so two
SD3-medium files never need four copies in memory. The frozen networks run in bf16 on CUDA, fp32 on the CPU
(--teacher-dtype); the student keeps fp32 master weights (--bf16: bf16 autocast).

A LoRA student (--lora RANK; sd3/lora.py has the details and the merge command): the same Algorithm 1,
checkpoints, resume and DDP, with adapters on a frozen network that shares the start network's tensors
(its EMA shares them too); it writes DIR/lora.safetensors (diffusers' SD3 LoRA format), and in the toy
world the merged student too.
    python distill.py --lora 4 --out runs/toy-lora

Real scale: --resume starts from the teacher when --out has no checkpoint yet, so the same line launches
and relaunches; it also works after a change of the number of GPUs (run/batches.py). Add --nnodes N
--node_rank R --rdzv_endpoint HOST:PORT to torchrun for several nodes. --fsdp: the student, its gradients,
AdamW state and EMA sharded across the GPUs instead of DDP's whole copy per GPU, same files
(run/parallel.py); --fsdp-teachers the teachers too; SD3.5-large on 80 GB GPUs needs both
(docs/MULTI_GPU.md). Memory per GPU for one distillation step: benchmarks/bench_memory.py.

Files (--out DIR; safetensors and JSON only, never pickle; every file written atomically):
    DIR/checkpoints/step-NNNNNNN/...  and DIR/checkpoints/latest: see run/training_state.py
    DIR/lora.safetensors (lora-ema.safetensors with --ema) for --lora, with the merged students in the toy world
    DIR/student.safetensors (+ fusion.safetensors; with --ema student-ema.safetensors and
    fusion-ema.safetensors) at the end, their metadata naming the method and the teacher sampler;
    distill.main returns the student's path (the EMA one with --ema); DIR/README.md, the model card
    (sd3/export.py); DIR/diffusers/ with --export-diffusers: transformer/ (config has txt_align_guidance:
    true, the flag the authors' released pipeline reads), and when --teacher is a diffusers pipeline folder
    its text encoders, tokenizers, VAE and scheduler (hard-linked) and model_index.json, a folder the
    released pipeline loads, with its own card (sd3/export.py); DIR/log.jsonl: one line per step: step,
    loss, lr, samples_per_s, teacher_s, student_s, step_s, grad_norm (before clipping), and sample_s where
    a grid was drawn; DIR/samples/step-NNNNNNN.png (sample grids: teacher | student at three w,
    run/monitor.py) and DIR/tensorboard with --report-to tensorboard; DIR/final.json: the final files with
    their sizes and SHA-256, for the checkpoint they come from (run/final_files.py); DIR/run.lock while a
    run holds DIR (cli.FolderLock).

Faults (the details: run/training_state.py, run/cli.py, run/options.py):
  * Bad input is refused before anything heavy loads: one line `error: ...`, exit status 2; a failure
    during the work (a non-finite loss or weight: NonFinite) exits 1, naming the step and the newest
    checkpoint whose tensors, read back from disk, are all finite. --traceback (or TEEFUSION_TRACEBACK=1)
    shows more.
  * One run per --out (DIR/run.lock). --resume continues from `latest`, or from the newest COMPLETE
    checkpoint with a warning; with none left it refuses. Only finite weights are ever written.
  * The final files are a pure function of the checkpoint at --steps: a relaunch writes those a kill left
    missing, and a relaunch of a finished run says so and writes nothing, exit 0 (run/final_files.py).
  * Under torchrun a worker dies with its launcher: `kill -9` of torchrun leaves no worker training.

    python -m pytest -q tests/test_distill.py tests/run
"""

import copy
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import embed
from mmdit import load_mmdit, load_mmdit_blend
from run import cli, final_files, monitor, options, parallel, ranks
from run.batches import StepSampler, WithNoise
from run.options import FULL, check_args, fill_defaults, lora_spec
from run.training_state import (LATEST, _trim_log, check_resume, complete_checkpoints, last_good, load_checkpoint,
                                non_finite, remove_temporaries, replica_checksums, resume_point, save_checkpoint)
from sd3 import export, lora


class NonFinite(FloatingPointError):
    """A non-finite loss, weight or output: the run stops (exit status 1)."""


def frozen(model):
    """A network that is only evaluated: no gradients, eval mode (the MMDiT has no dropout or
    batch norm, so eval() changes nothing today; it documents intent and guards the future)."""
    return model.requires_grad_(False).eval()


def student_bf16(args):
    """The student runs under bf16 autocast: --bf16, or a LoRA student over bf16 weights (the teacher's)."""
    return args.bf16 or (getattr(args, "lora", None) is not None and args.teacher_dtype == "bf16")


def teacher_bf16(args):
    """A bf16 teacher always runs under autocast (its inputs stay fp32, its matmuls run in bf16)."""
    return args.bf16 or args.teacher_dtype == "bf16"


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def trainable(module):
    """(names, parameters) of the module's trainable parameters, in its order: what AdamW updates and a
    checkpoint stores its moments under."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


class Run:
    """One distill.py run: its processes, networks, data, log, checkpoints and final files (see the module
    docstring). Constructing it checks the arguments and the data's index, before anything heavy;
    entering it sets up the process group, takes --out's lock (rank 0) and chooses the checkpoint to
    resume; leaving it releases both."""

    def __init__(self, args, dataset=None):
        """args: distill.py's options (defaults filled in here); dataset: a Dataset of {"latents",
        "context", "y", ...} items with .null(), or None for --data / the toy world's data."""
        fill_defaults(args)
        self.micro = check_args(args, ranks.from_environment()[1])  # before the process group
        if dataset is None and args.teacher is not None:
            from prepare import ShardDataset

            dataset = ShardDataset(args.data)  # index.json is checked here, each shard when it is first read
            if len(dataset) == 0:
                raise ValueError(f"--data {args.data} holds no samples (index.json lists none)")
        self.args, self.dataset = args, dataset
        self.lock, self.finished, self._resume = None, None, None
        self.fsdp, self.base, self.toy_world, self.sources = None, None, None, None
        self._log, self._bar, self._watch, self._batches = None, None, None, None

    # --- processes, the lock, the resume point

    def __enter__(self):
        args = self.args
        self.distributed, self.rank, self.world_size, self.device = setup_distributed(args)
        self._threads = torch.get_num_threads()
        try:
            # the toy world's tensors are tiny: one CPU thread per process is faster than several
            if args.teacher is None and self.device.type == "cpu":
                torch.set_num_threads(1)
            self.lock, resume = open_run(args, self.rank, self.distributed)
            if isinstance(resume, final_files.Finished):  # every final file there: nothing to do
                self.finished = resume.path
            else:
                self._resume = resume
        except BaseException:
            self.__exit__()
            raise
        self.accum = args.global_batch // (self.world_size * self.micro)  # accumulation rounds per step
        return self

    def __exit__(self, *exc):
        if self._batches is not None:
            self._batches.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        torch.set_num_threads(self._threads)
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # --- the networks

    def load_teachers(self):
        """The frozen networks of the teacher's step, (teacher, weak, main): the teacher (for w2sd the strong
        model), W2SD's weak model and, with --w2sd-final main, its main model (else None). Resolves the world
        first: the user's (--teacher, --data) or the toy world's."""
        args = self.args
        self.sources, self.dataset, self.toy_world = resolve_world(args, self.dataset, self.rank, self.distributed)
        if len(self.dataset) == 0:
            raise ValueError("the training data is empty")
        if args.teacher_dtype is None:
            args.teacher_dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.net_dtype = torch.bfloat16 if args.teacher_dtype == "bf16" else torch.float32  # the frozen networks
        # (--fsdp-teachers: on the CPU, then sharded onto the device with the student)
        at = torch.device("cpu") if args.fsdp_teachers else self.device
        self.teacher = frozen(load_network(self.sources["teacher"], at, self.net_dtype))
        self.weak, self.main = (frozen(load_network(self.sources[k], at, self.net_dtype)) if self.sources[k] else None
                                for k in ("weak", "main"))
        return self.teacher, self.weak, self.main

    def load_student_start(self):
        """The student's MMDiT at its start (the network that ends the teacher's step): an fp32 copy, or with
        --lora adapters on that frozen network (it shares its tensors, not copied). Then seeds torch with
        --seed, so that new weights (the adapters, here; the method's new modules, drawn next by the caller)
        start the same on every rank and world size."""
        args = self.args
        # --lora: the student's frozen weights are those of the network it starts from (shared, not copied)
        if args.lora is not None:
            self.base = self.main if self.sources["init"] == self.sources["main"] else self.teacher
        # (--fsdp: on the CPU, then sharded onto the device: no rank holds the whole student there)
        model = load_network(self.sources["init"], torch.device("cpu") if args.fsdp else self.device, torch.float32) \
            if self.base is None else None
        torch.manual_seed(args.seed)
        if self.base is not None:
            model = lora.attach(self.base, lora_spec(args))  # adapters: A drawn as nn.Linear draws, B = 0
        model.gradient_checkpointing = args.grad_checkpointing
        return model

    def make_ema(self, student):
        """--ema: a frozen copy of the student (a LoRA student's copy shares its frozen weights), else None."""
        if self.args.ema is None:
            return None
        shared = {id(t): t for t in (*student.parameters(), *student.buffers()) if not t.requires_grad} \
            if self.base is not None else {}
        return frozen(copy.deepcopy(student, shared))

    def shard(self, student, ema):
        """--fsdp: the student and its EMA sharded in place across the ranks (run/parallel.py; build AdamW
        after this, over the shards), and with --fsdp-teachers the teachers too. Else nothing."""
        if self.args.fsdp:
            teachers = [m for m in (self.teacher, self.weak, self.main) if m is not None]
            self.fsdp = parallel.FullShard(student, ema, self.device, teachers if self.args.fsdp_teachers else ())

    def data_parallel(self, student):
        """The module to call for the student's forward: DDP around it under torchrun, else the student."""
        return parallel.data_parallel(student, self.device, self.distributed, self.fsdp)

    # --- the start, the data

    def resume(self, student, ema, optimizer):
        """The step to start from: 0, or that of the checkpoint open_run chose, whose student, EMA and AdamW
        state are loaded. Seeds torch per rank (seed * world + rank, DiT's; Algorithm 1's draws are
        counter-based), trims log.jsonl to the start (rank 0) and prints what the run is."""
        args, names = self.args, trainable(student)[0]
        torch.manual_seed(args.seed * self.world_size + self.rank)
        start, ckpt = 0, None
        if self._resume is not None:  # chosen and checked by open_run before anything loaded
            ckpt = self._resume[0]
            start = self.fsdp.load_checkpoint(*self._resume, optimizer, names) if self.fsdp else \
                load_checkpoint(*self._resume, student, ema, optimizer, names)
        self.log_path = os.path.join(args.out, "log.jsonl")
        if self.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            if ckpt is not None:
                _trim_log(self.log_path, start)
            elif os.path.exists(self.log_path):
                os.remove(self.log_path)
            sources, base, params = self.sources, self.base, trainable(student)[1]
            print(f"distill: {args.method}, teacher {args.teacher_sampler} ({describe_source(sources['teacher'])}"
                  + (f", weak {describe_source(sources['weak'])}" if sources["weak"] else "")
                  + (f", main {describe_source(sources['main'])}" if sources["main"] else "")
                  + f"; student from {describe_source(sources['init'])}), {self.world_size} process(es) "
                  f"on {self.device}, global batch {args.global_batch} = {self.world_size} x {self.micro} x "
                  f"{self.accum} rounds, {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters"
                  + (f" (LoRA rank {args.lora} on {args.lora_targets}, trained fully: {args.lora_full}), "
                     if base else ", ")
                  + (f"resuming at step {start} from {ckpt}" if ckpt else "from step 0"))
        return start

    def null_prompt(self):
        """(context_null (1, L, Dc), y_null (1, Dy)): the encoded empty prompt, fp32 on the device."""
        context_null, y_null = self.dataset.null()
        return context_null.to(self.device, torch.float32), y_null.to(self.device, torch.float32)

    def micro_batches(self, start, draw):
        """The micro-batches of steps start.. on this rank (run/batches.py: the step number fixes its samples),
        each sample with t, w, eps = draw(p, shape) for its stream position p, floating tensors as fp32 on
        the device."""
        args, device = self.args, self.device
        sampler = StepSampler(len(self.dataset), args.seed, start, args.steps, args.global_batch, self.micro,
                              self.rank, self.world_size,
                              buckets=getattr(self.dataset, "bucket_ids", None))  # prepare.py's buckets
        workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
        loader = DataLoader(WithNoise(self.dataset, draw), batch_size=self.micro, sampler=sampler,
                            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
        self._batches = ({k: v.to(device, torch.float32, non_blocking=True)
                          if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
                         for batch in iter(loader))
        return self._batches

    # --- each step

    def start_monitor(self, start, student, ema, null):
        """Sample grids of the student (the EMA's with --ema) beside the teacher's, and TensorBoard, from step
        `start` on (run/monitor.py; rank 0). They leave the training bitwise unchanged."""
        args = self.args
        self._watch = monitor.Monitor(args, self.rank, start, self.dataset, self.toy_world,
                                      dict(student=ema or student, teacher=self.teacher, weak=self.weak,
                                           main=self.main), null, (teacher_bf16(args), student_bf16(args)),
                                      self.device)

    def steps(self, start):
        """The steps start, ..., --steps - 1, under a progress bar on rank 0."""
        args = self.args
        self._bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"distill {args.method}",
                         disable=self.rank != 0 or args.no_progress)
        return self._bar

    def global_batch_loss(self, loss, step):
        """The loss of the whole global batch (loss: this rank's mean, all-reduced over the ranks), a float.
        A non-finite one stops the run before the optimizer step (NonFinite, on every rank)."""
        if self.distributed:
            dist.all_reduce(loss)
            loss /= self.world_size
        value = loss.item()
        if not math.isfinite(value):
            raise NonFinite(f"non-finite loss ({value}) at step {step + 1}: training stopped before the optimizer "
                            f"step; {last_good(self.args.out, self.rank)}; lower --lr, or check the data and the "
                            "teacher")
        return value

    def record(self, done, loss, lr, step_s, teacher_s, student_s, grad_norm):
        """Rank 0: one line of log.jsonl for optimizer step `done` (the fields in the module docstring), a
        sample grid when one is due (its seconds as sample_s), TensorBoard, the progress bar's numbers."""
        if self.rank != 0:
            return
        samples_per_s = self.args.global_batch / step_s
        record = {"step": done, "loss": loss, "lr": lr, "samples_per_s": samples_per_s, "teacher_s": teacher_s,
                  "student_s": student_s, "step_s": step_s,
                  "grad_norm": grad_norm.item() if torch.isfinite(grad_norm) else None}
        record.update(self._watch.step(done, record))  # a sample grid when due: its seconds as sample_s
        self._log = self._log or open(self.log_path, "a")  # opened at the first record: a run refused before
        self._log.write(json.dumps(record) + "\n")           # its first step leaves no file
        self._log.flush()
        self._bar.set_postfix(loss=f"{loss:.4f}", sps=f"{samples_per_s:.1f}")

    def check_weights(self, done, student, ema, probe):
        """Every rank, before step `done`'s log line, sample grid and checkpoint, when a grid or a checkpoint
        is due: the weights must be finite (weights_problem), else NonFinite and nothing is written for the
        step (no log line, no grid of a broken student, no checkpoint)."""
        if not (self.checkpoint_due(done) or (self._watch is not None and self._watch.due(done))):
            return
        problem = weights_problem(student, ema, probe, student_bf16(self.args), self.distributed)
        if problem:
            raise NonFinite(f"after step {done} {problem}: training stopped, nothing was written for step {done}; "
                            f"{last_good(self.args.out, self.rank)}; lower --lr, or check the data and the teacher")

    def checkpoint_due(self, done):
        """Every --ckpt-every steps, and at the last step."""
        return done % self.args.ckpt_every == 0 or done == self.args.steps

    def save_checkpoint(self, done, student, ema, optimizer):
        """The checkpoint of step `done` (run/training_state.py), on rank 0, then a barrier. Only finite
        weights are written: check_weights ran before this step's log line (every tensor of the student and
        its EMA, and their velocities on the step's last micro-batch, finite)."""
        args = self.args
        names, params = trainable(student)
        # FSDP: the shards gathered whole on rank 0, into the files a DDP run writes (no replicas to compare)
        saved = self.fsdp.gather(optimizer) if self.fsdp else (student, ema, optimizer)
        replicas = None if self.fsdp else replica_checksums(params, self.distributed, self.world_size)
        if self.rank == 0:
            save_checkpoint(args.out, done, *saved, names, args, args.keep, replicas, student_metadata(args, done))
        del saved
        if self.distributed:
            dist.barrier()  # rank 0 saves, then everybody goes on

    # --- the end

    def finish(self, student, ema):
        """After the last step: the final files, beside the checkpoints, a pure function of the checkpoint at
        --steps (run/final_files.py); with --fsdp the student and EMA gathered whole on rank 0 first (every
        rank takes part). Returns the path distill.main returns."""
        if self._bar is not None:
            self._bar.close()
        if self._watch is not None:
            self._watch.close()
        if self._log is not None:
            self._log.close()
        if self._batches is not None:
            self._batches.close()  # the DataLoader's workers end here
            self._batches = None
        if self.fsdp:
            student, ema = self.fsdp.gather_modules()
        final = final_files.write(self.args, student, ema, self.base, self.toy_world, self.rank,
                                  student_metadata(self.args, self.args.steps))
        if self.distributed:
            dist.barrier()
        return final


def weights_problem(student, ema, probe, bf16, distributed):
    """Before a checkpoint: what is wrong with the weights, the same on every rank, or None. Every
    parameter and buffer of the student (MMDiT and fusion module) and of the EMA must be finite, and
    so must a forward of each on probe, the step's last micro-batch (weights of 1e30 are finite, and give
    inf and NaN)."""
    problem = non_finite([("student", student), ("EMA", ema)])
    problem = problem and f"the weights hold non-finite values ({problem})"
    if not problem:
        with torch.no_grad(), autocast(probe[0].device, bf16):
            for label, module in (("student", student), ("EMA", ema)):
                if module is not None and not torch.isfinite(module(*probe)).all():
                    problem = f"the {label}'s weights give a non-finite output (a forward on the step's last batch)"
                    break
    if distributed:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, problem)
        problem = next((p for p in every if p), None)
    return problem


def setup_distributed(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size, local_rank = ranks.from_environment()  # a partial or stray setting refused
    if args.device is not None:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return distributed, rank, world_size, device


def open_run(args, rank, distributed):
    """Before anything heavy: rank 0 (or the single process) takes --out's lock (cli.FolderLock),
    chooses the checkpoint to resume and checks it (start_point), and removes the temporary files a
    killed run left; the other ranks never touch the lock, and receive the outcome, the checkpoint
    or the refusal. Returns (the lock on rank 0, else None; (folder, state), None, or
    final_files.Finished)."""
    lock, outcome = None, None
    if rank == 0:
        try:
            lock = cli.FolderLock(args.out, "--out").acquire()
            outcome = start_point(args)
        except Exception as e:  # every rank raises it below
            if lock is not None:
                lock.release()
                lock = None
            outcome = e
    if distributed:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return lock, outcome


def start_point(args):
    """Under --out's lock: (folder, state) of the checkpoint to resume, or None to start from the
    teacher; refuses a run that would overwrite checkpoints without --resume, and a resume that
    cannot continue (check_resume). Then removes the temporary files of a killed run, and says so.
    A checkpoint at --steps: final_files.Finished (after one line) when every final file is there
    and intact; else (folder, state), from which the run writes the missing ones (run/final_files.py)."""
    root = os.path.join(args.out, "checkpoints")
    if not args.resume and (os.path.exists(os.path.join(root, LATEST)) or complete_checkpoints(root)):
        raise ValueError(f"{args.out} already holds checkpoints ({root}): pass --resume to continue that run, "
                         "or choose another --out")
    point = resume_point(args.out) if args.resume else None
    if point is not None:
        check_resume(*point, args)
    removed = remove_temporaries(args.out)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by a killed run: {', '.join(removed[:10])}"
              + (", ..." if len(removed) > 10 else ""))
    if point is not None and point[1]["step"] == args.steps:
        return final_files.finished(args, *point) or point
    return point


def resolve_world(args, dataset, rank, distributed):
    """The networks and the data: the user's (SD3 world) or the toy world's when there is no --teacher.
    Returns (sources, dataset, toy world or None); sources maps "teacher" (the frozen network the
    target's first move uses: for w2sd the strong model), "weak", "main" and "init" (the student's
    starting point) to a checkpoint path, or to (base, finetuned, scale) for a W2SD blend."""
    world = None
    if args.teacher is None:
        import toy  # the CPU toy world; imported only when used

        if distributed and rank != 0:
            dist.barrier()  # rank 0 builds (or trains) the toy world first; the others then read its cache
        world = toy.build_world(progress=rank == 0 and not args.no_progress)
        if distributed and rank == 0:
            dist.barrier()
        teacher, weak = world.teacher_path, args.weak or world.weak_path
        strong = args.strong or world.strong_path
        dataset = dataset if dataset is not None else world.dataset(split="train")
    else:
        teacher, weak, strong = args.teacher, args.weak, args.strong or args.teacher
    sources = dict(teacher=teacher, weak=None, main=None, init=teacher)
    if args.teacher_sampler == "w2sd":
        if args.w2sd_finetuned is not None:  # the W2SD release's pair from one fine-tune of the teacher
            blend = lambda scale: (teacher, args.w2sd_finetuned, scale)  # noqa: E731
            strong, weak, main = blend(args.strong_scale), blend(args.weak_scale), blend(args.main_scale)
        else:
            main = teacher
        sources.update(teacher=strong, weak=weak, main=main if args.w2sd_final == "main" else None)
        # the student starts from the model that makes the teacher step's final move (see the docstring)
        sources["init"] = sources["main"] if args.w2sd_final == "main" else strong
    return sources, dataset, world


def load_network(source, device, dtype):
    """A checkpoint path, or (base, finetuned, scale): base + scale (finetuned - base), streamed."""
    if isinstance(source, tuple):
        return load_mmdit_blend(*source, device=device, dtype=dtype)
    return load_mmdit(source, device, dtype)


def describe_source(source):
    if isinstance(source, tuple):
        base, tuned, scale = source
        return f"{base} {scale:+g} x ({tuned} - {base})"
    return source


def student_metadata(args, step):
    """What a student file records of its run (sd3/student_file.py and toy_report read it)."""
    meta = {"teefusion_method": args.method, "teefusion_teacher": args.teacher_sampler, "step": str(step),
            export.RUN_METADATA: json.dumps(export.run_info(args, step))}  # what the model card says
    if args.fused_scale is not None:  # Eq. 7's factor, which student_file.load_student applies again
        meta[embed.SCALE_METADATA] = repr(args.fused_scale)
    if getattr(args, "lora", None) is not None:
        meta[lora.METADATA] = json.dumps(lora_spec(args))
    return meta


def distill_every_student(args, distill_one):
    """--full: distill every student of FULL from the toy teacher (distill_one: distill.main on each one's
    arguments, into --out/NAME), then print one table with the teacher samplers and every student
    (toy_report.report) and write out/table.json and out/samples.png. Returns {subfolder name: student path}."""
    out, runs = options.full_runs(args)
    cli.output_folder(out, "--out")
    start = time.time()
    students = {}
    for (name, _, _), sub in zip(FULL, runs):
        students[name] = distill_one(sub)  # with --resume, a finished student says so and is reused
    import toy
    from evaluation import toy_report

    world = toy.build_world(progress=False)
    toy_report.report(world, [dict(path=students[name], teacher=sampler) for name, _, sampler in FULL], out_dir=out,
                      sweep_ws=toy_report.SWEEP_WS, progress=not args.no_progress)
    print(f"--full: {len(FULL)} students and the table in {(time.time() - start) / 60:.1f} minutes; {out}")
    return students
