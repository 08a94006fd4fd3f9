"""`cbd-cache`: the command line. Every command takes --pipeline, --workdir and any number of --set key=value."""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from cbd_cache import __version__, pipeline
from cbd_cache.cache.info import cache_info, info_text
from cbd_cache.config import DEFAULT_PIPELINE, Config, load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import ConfigError, exit_line, interrupted_line
from cbd_cache.experiments.grid import (
    DEFAULT_ROWS,
    parse_axes,
    parse_replicates,
    run_grid,
)
from cbd_cache.experiments.paper_design import SECTION_KEYS
from cbd_cache.experiments.paper_table import paper_table as run_paper_table
from cbd_cache.experiments.sweep import parse_grid, parse_seeds, run_sweep
from cbd_cache.stages.imported import import_teacher as run_import
from cbd_cache.stages.ncm import SOURCES, ncm_report
from cbd_cache.system import distributed
from cbd_cache.system.allocator import keep_freed_memory
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.signals import raise_on_signals
from cbd_cache.system.storage import atomic_write_bytes
from cbd_cache.tools.dryrun import dry_run as plan_dry_run
from cbd_cache.tools.portable import export_model
from cbd_cache.tools.predict import (
    list_inputs,
    model_checkpoint,
    predict_files,
    predictions_csv,
)
from cbd_cache.tools.training_logs import last_epochs_text, logs_csv
from cbd_cache.tools.verify import verify_cache, verify_text
from cbd_cache.train.evaluation import results_table
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir


class Context:
    def __init__(self, cfg: Config, workdir: Path):
        if workdir.exists() and not workdir.is_dir():
            raise ConfigError(f"--workdir {workdir} is a file, not a folder: choose another --workdir")
        self.cfg = cfg
        self.wd = Workdir(workdir, cfg.pipeline.data_url, cfg.pipeline.cache_url)
        self._runtime = None

    @property
    def runtime(self):
        """The device, and under torchrun this process's rank (joining the process group on first use)."""
        if self._runtime is None:
            keep_freed_memory()   # CPU work reuses freed blocks instead of page-faulting them in again (allocator.py)
            self._runtime = make_runtime(self.cfg.pipeline)
        return self._runtime

    @property
    def main(self) -> bool:
        """Rank 0 (or no torchrun): the process that prepares, evaluates and writes shared files."""
        return self.runtime.dist.main


def resume_option(fn):
    """--resume: kept for old scripts; an interrupted run always continues from its resume point (resume.pt)."""
    @click.option("--resume", is_flag=True,
                  help="No-op, kept for old scripts: an interrupted run always continues from its resume.pt.")
    @functools.wraps(fn)
    def wrapper(ctx: Context, resume: bool, **kwargs):
        return fn(ctx, **kwargs)
    return wrapper


def jobs_option(fn):
    """--jobs J: J student runs at once, one process each (one GPU each on a GPU machine), logs in W/sweeps/logs."""
    return click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
                        help="Train this many runs at once, one process each (on GPUs: one GPU each, round robin); "
                             "each run's output goes to W/sweeps/logs/<run>.log.")(fn)


def pipeline_options(fn=None, *, workdir_default: str = "runs/{name}"):
    """--pipeline / --workdir / --set, loaded and validated into a Context before anything is written."""
    if fn is None:
        return functools.partial(pipeline_options, workdir_default=workdir_default)

    @click.option("--pipeline", "pipeline", default=DEFAULT_PIPELINE, show_default=True,
                  help="Pipeline recipe (TOML).")
    @click.option("--workdir", default=None,
                  help=f"Where data, checkpoints and the cache live [{workdir_default.replace('{name}', '<pipeline name>')}].")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set student.alpha=0.2 (repeatable).")
    @functools.wraps(fn)
    def wrapper(pipeline: str, workdir: str | None, overrides: tuple[str, ...], **kwargs):
        cfg = load_config(pipeline, overrides)
        return fn(Context(cfg, Path(workdir or workdir_default.format(name=cfg.pipeline.name))), **kwargs)
    return wrapper


class CLI(click.Group):
    """Turns expected failures into one line on stderr: exit 2 for bad input, 1 for a failed stage, 130
    when interrupted. Anything else is a bug and keeps its traceback; `--debug` keeps every traceback."""

    def invoke(self, ctx):
        raise_on_signals()   # SIGTERM as Ctrl-C: one line, exit 143 (a training stage first saves its resume point)
        try:
            result = super().invoke(ctx)
            distributed.barrier()    # under torchrun no rank leaves before the others are done
            return result
        except KeyboardInterrupt as e:
            line, code = interrupted_line(e, ctx.invoked_subcommand or "cbd-cache")
            click.echo(f"cbd-cache: {line}", err=True)
            sys.exit(code)
        except click.UsageError as e:    # a bad option value: one line too
            if e.ctx is None or ctx.params.get("debug"):
                raise
            click.echo(f"cbd-cache: error: {e.format_message().rstrip('.')}; see `{e.ctx.command_path} --help`", err=True)
            sys.exit(2)
        except Exception as e:
            line = exit_line(e, ctx.invoked_subcommand)
            if line is None or ctx.params.get("debug"):
                raise
            click.echo(f"cbd-cache: error: {line[0]}", err=True)
            sys.exit(line[1])
        finally:
            distributed.shutdown()


@click.group(cls=CLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cbd-cache")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of its one line.")
def main(debug: bool):
    """Class-Balanced Distillation with a cache of teacher descriptors.

    Stages: prepare -> train-teacher (or import-teacher) -> export -> train-student -> evaluate (or `run` for all).
    """
    # When one chunk of a multi-chunk read fails, zarr leaves the other reads pending on its I/O loop,
    # and asyncio would print them at exit under the one error line; the project runs no asyncio of its own.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


@main.command()
@click.option("--dry-run", is_flag=True,
              help="List the source and print class counts, shards, cache size and an export-time estimate; write nothing.")
@pipeline_options
def prepare(ctx: Context, dry_run: bool):
    """Write WebDataset shards (train, val, test) and a manifest from `data.format` at `data.root` (resumable)."""
    if dry_run:
        click.echo(plan_dry_run(ctx.cfg, ctx.runtime))
        return
    pipeline.prepare_data(ctx.cfg, ctx.wd, ctx.runtime)


@main.command("train-teacher")
@click.option("--name", "names", multiple=True, help="Teacher(s) to train (repeatable) [all in the pipeline].")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train this many teachers at once, one process each (on GPUs: one GPU each, round robin).")
@pipeline_options
@resume_option
def train_teacher(ctx: Context, names: tuple[str, ...], jobs: int):
    """Stage 1: train teachers with instance sampling; skips teachers already trained with the same config."""
    teachers = [ctx.cfg.teacher_by_name(n) for n in names] if names else None
    pipeline.train_teachers(ctx.cfg, ctx.wd, ctx.runtime, teachers, jobs)


@main.command("import-teacher")
@click.argument("name")
@click.option("--checkpoint", "path", required=True, type=click.Path(dir_okay=False),
              help="The checkpoint file (a local file: nothing is downloaded).")
@click.option("--arch", default="", help="Its architecture, as the teacher's [[teachers]] entry names it "
              "(torchvision resnet*/resnext*/wide_resnet*, or timm:<name>) [the entry's].")
@click.option("--key", "keys", multiple=True, metavar="A.B",
              help="Where the state dict sits in the file, e.g. state_dict_best.feat_model (repeatable: merged) "
                   "[bare, state_dict_best, state_dict or model].")
@click.option("--trust", is_flag=True, help="Unpickle a file holding more than tensors (runs its code: trusted files only).")
@pipeline_options
def import_teacher(ctx: Context, name: str, path: str, arch: str, keys: tuple[str, ...], trust: bool):
    """Make teacher NAME (source = "imported" in the pipeline) from a checkpoint trained elsewhere; evaluate it."""
    if ctx.main:
        run_import(ctx.cfg, ctx.wd, ctx.runtime, name, Path(path), arch, keys, trust)


@main.command()
@click.option("--repair", is_flag=True,
              help="Read every chunk, then rewrite only the damaged shards (and lost metadata), bit-identical.")
@click.option("--teachers", default="", metavar="A,B", help="Export only these teachers [every teacher of the pipeline].")
@click.option("--replace", "replace", multiple=True, metavar="NAME",
              help="Rewrite teacher NAME's group (after retraining it); the other groups stay (repeatable).")
@pipeline_options
def export(ctx: Context, repair: bool, teachers: str, replace: tuple[str, ...]):
    """Run the teachers the cache lacks over A views of every training image into the Zarr cache (resumable).

    Teachers already in the cache are not run again; each teacher is a group of its own, so exports of
    different teachers (--teachers) may run at once.
    """
    names = [n.strip() for n in teachers.split(",") if n.strip()]
    pipeline.export(ctx.cfg, ctx.wd, ctx.runtime, repair, names, list(replace))


@main.command("train-student")
@pipeline_options
@resume_option
def train_student(ctx: Context):
    """Stage 2: train the student from the cache (no teacher runs), class-balanced."""
    pipeline.train_student(ctx.cfg, ctx.wd, ctx.runtime)


@main.command()
@pipeline_options
def evaluate(ctx: Context):
    """Evaluate every teacher and student in the workdir; write results.md and results.json."""
    pipeline.evaluate(ctx.cfg, ctx.wd, ctx.runtime)
    print_results(ctx)


def print_results(ctx: Context) -> None:
    if ctx.main:
        click.echo(ctx.wd.results_md.read_text())


@main.command()
@pipeline_options
@resume_option
def run(ctx: Context):
    """Every stage in order, skipping what is already done; prints the results table."""
    pipeline.run(ctx.cfg, ctx.wd, ctx.runtime)
    print_results(ctx)


@main.command()
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...",
              help="A student setting and its values, e.g. student.alpha=0,0.2,0.4 (repeatable: the grid is the product).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of every grid point (student.seed).")
@click.option("--name", default="", help="Table name under W/sweeps/ [sweep_<keys>].")
@jobs_option
@pipeline_options
@resume_option
def sweep(ctx: Context, grids: tuple[str, ...], seeds: str, name: str, jobs: int):
    """Train a grid of student settings x seeds from one cache (finished runs are skipped); mean ± std table."""
    grid, seed_list = parse_grid(grids), parse_seeds(seeds)
    _, md = run_sweep(ctx.cfg, ctx.wd, ctx.runtime, grid, seed_list, name, jobs)
    click.echo(md.read_text())


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--features", type=click.Choice(SOURCES), default="images", show_default=True,
              help="Class means from the model run over the training images, or from its cached descriptors.")
@pipeline_options
def ncm(ctx: Context, models: tuple[str, ...], features: str):
    """Nearest-class-mean accuracy of MODELS (teachers/<name>, students/<run>) on centred, normalised features."""
    rows = [{"model": m, "kind": f"NCM ({features} features)", **ncm_report(ctx.cfg, ctx.wd, ctx.runtime, m, features)}
            for m in models]
    click.echo(results_table(rows))


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--run", "ref", required=True, metavar="students/<run>", help="The model: students/<run> or teachers/<name>.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes per image.")
@click.option("--out", default="-", show_default=True, help="The CSV file (-: stdout).")
@pipeline_options
def predict(ctx: Context, paths: tuple[str, ...], ref: str, top_k: int, out: str):
    """Top-k classes and scores of image files, folders (their images) or .txt lists of paths, as CSV.

    Images are read as prepare reads them, under the workdir's evaluation view; a bad file is a row with its error.
    """
    if out != "-" and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder: give the CSV file's name (or - for stdout)")
    manifest = Manifest.load(ctx.wd.manifest)
    files = list_inputs(paths)
    k = min(top_k, manifest.num_classes)
    rows = predict_files(model_checkpoint(ctx.wd.root, ref), files, manifest, ViewSpec.from_cfg(ctx.cfg.views),
                         ctx.runtime, k, ctx.cfg.eval.batch_size)
    text = predictions_csv(rows, k)
    if out == "-":
        click.echo(text, nl=False)
    else:
        atomic_write_bytes(Path(out), text.encode())
    bad = sum(1 for r in rows if r["error"])
    log(f"[predict] {len(rows)} files, {bad} unreadable" + ("" if out == "-" else f"; wrote {out}"))


@main.command("export-model")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--run", "ref", required=True, metavar="students/<run>", help="The model: students/<run> or teachers/<name>.")
@pipeline_options
def export_model_command(ctx: Context, out: Path, ref: str):
    """Write OUT/model.safetensors and OUT/model.json: the model, loadable without cbd-cache (README: Use the student)."""
    path = export_model(model_checkpoint(ctx.wd.root, ref), out, Manifest.load(ctx.wd.manifest),
                        ViewSpec.from_cfg(ctx.cfg.views), ref)
    click.echo(f"wrote {out / 'model.safetensors'} and {path}")


@main.command()
@click.argument("folder", metavar="[WORKDIR]", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--csv", "as_csv", is_flag=True, help="Every epoch of every run as CSV: run, epoch, then each log.jsonl key.")
@pipeline_options
def logs(ctx: Context, folder: Path | None, as_csv: bool):
    """The training logs (log.jsonl) of every teacher and student: last epoch per run, or all as CSV.

    WORKDIR, when given, is the workdir (as --workdir).
    """
    workdir = folder or ctx.wd.root
    if as_csv:
        click.echo(logs_csv(workdir), nl=False)
        return
    click.echo(last_epochs_text(workdir))


@main.command("paper-table")
@click.option("--out", default="results", show_default=True, help="Folder for <pipeline name>.md/.json and the PNGs.")
@click.option("--time-limit-min", type=float, default=0, show_default=True,
              help="Start no new run after this many minutes (0: no limit); run again to continue.")
@click.option("--sections", default="", metavar="S1,S2",
              help="Train only these sections (table2, views, alpha, mix, table4, controls) [all]; the report shows what "
                   "is finished.")
@jobs_option
@pipeline_options(workdir_default="runs/{name}_paper")
@resume_option
def paper_table(ctx: Context, out: str, time_limit_min: float, sections: str, jobs: int):
    """The paper's Tables 1-5, Figures 1, 3 and 4, controls, calibration, the view study and per-class plots, 3 seeds."""
    only = [k.strip() for k in sections.split(",") if k.strip()]
    if unknown := [k for k in only if k not in SECTION_KEYS]:
        raise ConfigError(f"--sections {sections}: no section {unknown[0]!r}; choose from {', '.join(SECTION_KEYS)}")
    if not run_paper_table(ctx.cfg, ctx.wd, ctx.runtime, Path(out), time_limit_min, jobs, only):
        click.echo("paper-table: stopped at the time limit; the same command continues where it stopped", err=True)
        sys.exit(3)
    click.echo((Path(out) / f"{ctx.cfg.pipeline.name}.md").read_text())


@main.command()
@click.option("--axis", "axes", multiple=True, metavar="KEY[+KEY...]=V1,V2,...",
              help="A setting and its values; keys joined by + take each value together, e.g. "
                   "teacher.epochs+student.epochs=20,40 (repeatable: the cells are the product).")
@click.option("--replicates", default="0,1,2", show_default=True,
              help="Replicates of every cell: replicate r redraws the data and every seed (data.seed + r, ...).")
@click.option("--rows", default=",".join(DEFAULT_ROWS), show_default=True, metavar="ROW1,ROW2",
              help="The rows of every cell, by the paper table's labels, 'CBD_ENS online' or 'CBD_ENS A=<views>'.")
@click.option("--name", default="grid", show_default=True, help="Table name: W/grids/<name>.{md,json}.")
@click.option("--time-limit-min", type=float, default=0, show_default=True,
              help="Start no new step after this many minutes (0: no limit); run again to continue.")
@jobs_option
@pipeline_options(workdir_default="runs/{name}_grid")
@resume_option
def grid(ctx: Context, axes: tuple[str, ...], replicates: str, rows: str, name: str, time_limit_min: float, jobs: int):
    """The whole protocol per cell of a grid (data, teacher and student settings), each cell a workdir of its own,
    over replicates that redraw the data; one table."""
    row_list = [r.strip() for r in rows.split(",") if r.strip()]
    _, complete = run_grid(ctx.cfg, ctx.wd.root, ctx.runtime, parse_axes(axes), parse_replicates(replicates),
                           row_list, name, time_limit_min, jobs)
    click.echo((ctx.wd.root / "grids" / f"{name}.md").read_text())
    if not complete:
        click.echo("grid: stopped at the time limit; the same command continues where it stopped", err=True)
        sys.exit(3)


@main.group()
def cache():
    """Inspect the teacher-descriptor cache."""


@cache.command()
@click.option("--rows", default=64, show_default=True, type=click.IntRange(min=0),
              help="Random rows to recompute with the stored teachers.")
@click.option("--seed", default=0, show_default=True, help="Seed of the row sample.")
@click.option("--tolerance", default=5e-3, show_default=True, help="Largest cosine error (1 - cos) accepted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pipeline_options
def verify(ctx: Context, rows: int, seed: int, tolerance: float, as_json: bool):
    """Completeness, fingerprints, unit-norm rows, and a random sample of rows recomputed by the teachers.

    Exits 1 on any mismatch.
    """
    manifest = Manifest.load(ctx.wd.manifest)
    report = verify_cache(ctx.wd.cache, manifest, ctx.wd.teacher_checkpoint, ctx.runtime, rows, seed, tolerance)
    click.echo(json.dumps(report, indent=1) if as_json else verify_text(report))
    if report["problems"]:
        sys.exit(1)


@cache.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pipeline_options
def info(ctx: Context, as_json: bool):
    """Arrays, shapes, dtypes, chunking, fingerprint, completeness, bytes, and each teacher's state."""
    d = cache_info(ctx.wd.cache, ctx.wd.teacher_checkpoint, [t.name for t in ctx.cfg.teachers])
    click.echo(json.dumps(d, indent=1) if as_json else info_text(d))


@cache.command()
@click.argument("name")
@pipeline_options
def drop(ctx: Context, name: str):
    """Remove teacher NAME's group from the cache, at once; the other teachers and the views stay."""
    pipeline.drop_teacher(ctx.wd, name)


if __name__ == "__main__":
    main()
