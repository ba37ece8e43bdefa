"""The ``ncpvae`` command.

User errors print one line on stderr and exit with status 2 (``--debug`` shows the traceback);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ncpvae.defaults import shipped_default
from ncpvae.errors import NcpvaeError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--strict-plugins", action="store_true",
                        help="fail when a third-party plugin does not load")


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. --set objective.beta=4 or "
                             "--set prior=gaussian (repeatable)")


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


def _seeds(text: str) -> list[int]:
    """An argparse type: ``--seeds 0,1,2`` or ``0-2`` (:func:`ncpvae.run.seed_sweep.parse_seeds`)."""
    from ncpvae.run.seed_sweep import parse_seeds

    try:
        return parse_seeds(text)
    except NcpvaeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes are one line too (``--help`` shows the usage)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ncpvae",
        description="Train beta-VAEs, fit Noise-Contrastive Priors on their latents and sample "
                    "them with Langevin-type samplers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("train", help="run the whole pipeline (default: the built-in config)")
    p.add_argument("config", nargs="?", default=None,
                   help="a TOML file or a built-in config name (default: 'default')")
    _overrides(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="SEEDS",
                   help="run the pipeline once per seed (e.g. 0,1,2 or 0-2) into OUT-seed<s> "
                        "(OUT: --out or runs/<name>), then write the mean ± SE over seeds into "
                        "OUT-seeds; run again, it skips finished seeds and resumes unfinished ones")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(p)

    p = sub.add_parser("aggregate", help="mean ± SE over seeds of finished runs' headline numbers",
                       description="Aggregate finished runs of one config that differ in their "
                                   "seed: mean, SE (sample SD / sqrt(n)) and every seed's value "
                                   "of the headline numbers, written as aggregate.json, "
                                   "aggregate.md and aggregate.html.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, one per seed")
    p.add_argument("--out", default=None,
                   help="output directory (default: X-seeds when the runs are X-seed<s>)")
    _common(p)

    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("run", help="run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(p)

    p = sub.add_parser("fit-prior", help="(re)fit the learned prior of an existing run, from "
                                         "a fresh initialisation (--continue: from its weights)")
    p.add_argument("run", help="run directory")
    _overrides(p)
    p.add_argument("--continue", dest="continue_fit", action="store_true",
                   help="continue the fit from the prior's current (fitted) weights instead of "
                        "the fresh initialisation a run's fit stage starts from")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(p)

    p = sub.add_parser("sample", help="sample a trained run's prior and decode the samples")
    p.add_argument("run", help="run directory")
    _overrides(p)
    p.add_argument("--prior", default=None, help="swap the prior section by name")
    p.add_argument("--sampler", default=None, help="sampler name (e.g. langevin, sgld, sir)")
    p.add_argument("--chains", type=_count(1), default=None, help="number of chains / samples")
    p.add_argument("--steps", type=_count(0), default=None, help="sampler steps")
    p.add_argument("--out", default=None, help="output directory (default: RUN/sampling)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the samples of an earlier `ncpvae sample` in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(p)

    p = sub.add_parser("evaluate", help="evaluate a trained run and write its report")
    p.add_argument("run", help="run directory")
    _overrides(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(p)

    p = sub.add_parser(
        "compare-priors",
        help="fit several priors on a run's frozen VAE and compare them with N(0, I): held-out "
             "aggregate-posterior fit, IW bound and KID of decoded samples (paired differences "
             "with SEs), fit time, samples/s",
        description="Fit each listed prior on the run's frozen VAE and compare it with N(0, I) "
                    "on the same held-out draws, test images and KID subsets (paired "
                    "differences with their SEs). Writes table.json, table.md, gains.png and "
                    "sample grids into RUN/compare_priors after every prior (an interrupted "
                    "comparison keeps its rows; a rerun with the same settings skips priors "
                    "already done) and adds the table to the run's report.")
    p.add_argument("run", help="run directory")
    p.add_argument("--priors", default=None,
                   help="comma-separated prior specs: names, 'tilted:base' (e.g. ncp:gmm) or "
                        f"'run' (default: {','.join(shipped_default('compare-priors', 'priors'))})")
    p.add_argument("--heldout", type=int, default=None,
                   help="held-out test images for the cross-entropy (default: all)")
    p.add_argument("--train", type=int, default=None,
                   help="training encodings to fit on (a seeded subset; default: all)")
    p.add_argument("--iw-images", type=_count(0), default=None,
                   help="test images for the IW bound (default: evaluate.likelihood.num_examples;"
                        " 0: skip it)")
    p.add_argument("--iw-samples", type=_count(1), default=None,
                   help="importance samples K per image (default: "
                        "evaluate.likelihood.num_samples)")
    p.add_argument("--kid-samples", type=_count(0), default=None,
                   help="decoded samples per prior for KID, and as many test images at most "
                        "(default: 10000; 0: skip sample quality)")
    p.add_argument("--kid-subsets", type=_count(2), default=None,
                   help="disjoint KID subsets, the SE's degrees of freedom + 1 (default: 20)")
    p.add_argument("--kid-reference", choices=("test", "train"), default="test",
                   help="the real images of KID: test images (default) or training images (for "
                        "a small test set; every prior shares the decoder, so the paired "
                        "differences stay fair)")
    p.add_argument("--option", dest="prior_options", action="append", default=[],
                   metavar="PRIOR.FIELD=VALUE",
                   help="override a prior's config field, e.g. flow.epochs=30 (repeatable)")
    p.add_argument("--fresh", action="store_true",
                   help="recompute every prior (default: reuse the rows of an earlier "
                        "comparison in the output folder made with the same settings)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/compare_priors)")
    _overrides(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(p)

    p = sub.add_parser("embed", help="write the encoder's mu and logvar (and labels/factors "
                                     "where the dataset has them) of a split as a .npz file")
    p.add_argument("run", help="run directory (or an `ncpvae export` folder)")
    p.add_argument("--split", choices=("train", "test"), default="test",
                   help="which images to encode (default: test)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--device", default=None,
                   help="device to encode on (default: the run's configured device)")
    _common(p)

    p = sub.add_parser("export", help="write a run as a shareable folder (safetensors weights, "
                                      "config, model card) or push it to the Hugging Face Hub")
    p.add_argument("run", help="run directory")
    p.add_argument("dir", nargs="?", default=None,
                   help="the folder to write (with --hub: also kept there)")
    p.add_argument("--hub", default=None, metavar="REPO_ID",
                   help="push the export to this Hugging Face Hub model repository "
                        "(pip install 'ncpvae[hub]')")
    p.add_argument("--private", action="store_true", help="with --hub: create a private repo")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    _common(p)

    p = sub.add_parser("plugins", help="list loaded plugins with their versions and components")
    _common(p)
    p = sub.add_parser("list", help="list registered components")
    p.add_argument("kind", nargs="?", default=None,
                   help="dataset, model, prior, objective, sampler or logger")
    _common(p)
    p = sub.add_parser("describe", help="show a component's config fields and capabilities")
    p.add_argument("kind")
    p.add_argument("name")
    _common(p)
    p = sub.add_parser("schema", help="print the JSON Schema of run configs (with installed plugins)")
    _common(p)
    p = sub.add_parser("validate", help="validate a config file and print it resolved")
    p.add_argument("config", nargs="?", default=None)
    _overrides(p)
    _common(p)
    return parser


def _manager(args: argparse.Namespace):
    from ncpvae.plugin_manager import get_plugin_manager

    return get_plugin_manager(strict=args.strict_plugins)


def cmd_train(args: argparse.Namespace) -> int:
    from ncpvae.config import load_config
    from ncpvae.experiment import train
    from ncpvae.run.summary_text import format_run_summary, repeat_directory

    manager = _manager(args)
    config = load_config(args.config, args.overrides, manager.registry)
    if args.seeds is not None:
        return _train_seeds(args, config, manager)
    # `ncpvae train runs/X/config.toml` repeats run X: into runs/<name>-2 when X is the output
    out, note = repeat_directory(args.config, config.name, args.out, args.overwrite)
    if note is not None:
        print(f"ncpvae train: {note}", file=sys.stderr)
    if out is None:  # create_run's default, named here to lock it
        out = args.out if args.out is not None else os.path.join("runs", config.name)
    with _writer_lock(args, out, create=True):  # the new-run check and creation under the lock
        path = train(config, out, overwrite=args.overwrite, quiet=args.quiet, manager=manager)
    print(format_run_summary(path))
    return 0


def _train_seeds(args: argparse.Namespace, config: Any, manager: Any) -> int:
    """``ncpvae train --seeds``: every seed's run (each summary printed), then the aggregate."""
    from pathlib import Path

    from ncpvae.experiment import DEFAULT_STAGES
    from ncpvae.run.distributed import env_rank
    from ncpvae.run.lock import command_line
    from ncpvae.run.seed_sweep import aggregate_directory, run_seeds
    from ncpvae.run.summary_text import format_run_summary

    base = Path(args.out) if args.out is not None else Path("runs") / config.name

    def report(item: Any) -> None:
        if item.action == "skip":
            print(f"seed {item.seed}: finished run in {item.path}, skipped")
        else:
            print(f"seed {item.seed}: " + format_run_summary(item.path))

    paths = run_seeds(config, args.seeds, base, DEFAULT_STAGES, overwrite=args.overwrite,
                      quiet=args.quiet, manager=manager, command=command_line(args.argv),
                      on_seed=report)
    if env_rank() == 0:  # the writer alone (ranks > 0 print nothing either)
        _write_aggregate([str(p) for p in paths], aggregate_directory(base))
    return 0


def _write_aggregate(runs: Sequence[str], out: Any) -> None:
    """Aggregate ``runs`` into ``out`` and print where, then the table (the output's end)."""
    from ncpvae.evaluation.aggregate import aggregate_runs, format_aggregate, write_aggregate

    result = aggregate_runs(runs)
    files = write_aggregate(out, result)
    print(f"aggregate over seeds written to {out} ({', '.join(f.name for f in files)})")
    print(format_aggregate(result))


def cmd_aggregate(args: argparse.Namespace) -> int:
    from ncpvae.run.seed_sweep import aggregate_directory, sweep_base

    out = args.out
    if out is None:  # X-seed0, X-seed1, ... -> X-seeds
        bases = {sweep_base(run) for run in args.runs}
        if len(bases) != 1 or None in bases:
            raise NcpvaeError("the runs are not the X-seed<s> directories of one sweep X; "
                              "pass --out DIR")
        out = aggregate_directory(bases.pop())
    _write_aggregate(args.runs, out)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from ncpvae.experiment import resume

    path = resume(args.run, quiet=args.quiet, manager=_manager(args))
    print(f"run finished in {path}")
    return 0


def cmd_fit_prior(args: argparse.Namespace) -> int:
    from ncpvae.io import to_plain_json
    from ncpvae.prior import LearnedPrior
    from ncpvae.run import progress
    from ncpvae.run.build import open_run
    from ncpvae.run.directory import RunDirectory
    from ncpvae.run.fit import fit_prior
    from ncpvae.run.sample import sample_stage
    from ncpvae.run.stages import finish_loggers

    progress.require_finished(RunDirectory.open(args.run), "fit-prior")
    run = open_run(args.run, args.overrides, registry=_manager(args).registry, quiet=args.quiet,
                   fresh_prior=not args.continue_fit)
    if not isinstance(run.prior, LearnedPrior):
        raise NcpvaeError(f"the run's prior '{run.prior.name}' has nothing to fit; "
                          "use --set prior=ncp")
    if run.is_writer and args.overrides:  # keep the refitted run's config true
        from ncpvae.config import config_to_toml

        run.directory.write_config(config_to_toml(run.config))
    summary = fit_prior(run)  # under torchrun: every rank fits, only rank 0 writes
    removed = invalidate_after_refit(run.directory) if run.is_writer else []
    sample_stage(run)
    finish_loggers(run)  # the refit's records went to the trackers: close them
    if not run.is_writer:  # a rank > 0 of a torchrun launch: rank 0 reports
        return 0
    print(json.dumps(to_plain_json(summary), indent=2))
    note = (f"removed what depended on the old prior: {', '.join(removed)}; " if removed else "")
    print(f"ncpvae fit-prior: {note}samples.pt and plots/samples.png regenerated; run "
          f"`ncpvae evaluate {args.run}` for a new evaluation", file=sys.stderr)
    return 0


def invalidate_after_refit(directory: Any) -> list[str]:
    """Remove the outputs computed from the previous prior (evaluation, report, ``ncpvae sample``
    output, the summary's evaluation section); return their names."""
    import shutil

    from ncpvae.io import write_json

    removed = []
    for path in (directory.evaluation, directory.report("html"), directory.report("markdown")):
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    if directory.sampling.is_dir():
        shutil.rmtree(directory.sampling)
        removed.append(directory.sampling.name + "/")
    for stale in directory.plots.glob("eval_samples_*.png"):
        stale.unlink()
        removed.append(f"plots/{stale.name}")
    summary = directory.read_summary()
    if "evaluation" in summary:
        del summary["evaluation"]
        write_json(directory.summary, summary)
        removed.append("summary.json's evaluation section")
    return removed


def cmd_sample(args: argparse.Namespace) -> int:
    from ncpvae.run.sample_command import sample_command

    # --prior/--sampler swap a whole section: applied first, so --set can adjust the new one
    overrides = [f"prior={args.prior}"] if args.prior else []
    if args.sampler:
        overrides.append(f"sampler={args.sampler}")
    overrides += args.overrides
    if args.steps is not None:
        overrides.append(f"sampler.num_steps={args.steps}")
    out = sample_command(args.run, overrides, chains=args.chains, out=args.out,
                         quiet=args.quiet, registry=_manager(args).registry,
                         overwrite=args.overwrite)
    print(f"samples written to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ncpvae.evaluation.pipeline import evaluate_command
    from ncpvae.run import progress
    from ncpvae.run.directory import RunDirectory

    progress.require_finished(RunDirectory.open(args.run), "evaluate")
    out = evaluate_command(args.run, args.overrides, quiet=args.quiet,
                           registry=_manager(args).registry)
    print(f"evaluation written to {out}")
    return 0


def cmd_compare_priors(args: argparse.Namespace) -> int:
    from ncpvae.evaluation.compare import (
        DEFAULT_PRIORS,
        CompareSettings,
        compare_priors,
        format_table,
        parse_options,
    )

    priors = DEFAULT_PRIORS if args.priors is None else tuple(
        p.strip() for p in args.priors.split(",") if p.strip())
    sizes = {k: v for k, v in (("kid_samples", args.kid_samples),
                                ("kid_subsets", args.kid_subsets)) if v is not None}
    settings = CompareSettings(priors, overrides=args.overrides, num_heldout=args.heldout,
                               num_train=args.train, iw_images=args.iw_images,
                               iw_samples=args.iw_samples, **sizes,
                               kid_reference=args.kid_reference,
                               options=parse_options(args.prior_options), fresh=args.fresh,
                               out=args.out, quiet=args.quiet)
    result = compare_priors(args.run, settings, registry=_manager(args).registry)
    print(format_table(result), end="")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from ncpvae.api import open_run
    from ncpvae.run.embed import check_out, embed_arrays, write_embedding

    out = check_out(args.out)  # before the run is opened
    run = open_run(args.run, device=args.device, registry=_manager(args).registry)
    arrays = embed_arrays(run.model, run.data, args.split, run.device)
    write_embedding(out, arrays)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    print(f"{args.split} embeddings written to {out}: {shapes}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ncpvae.run.export import export_run, push_to_hub

    registry = _manager(args).registry
    if args.hub is not None:
        url = push_to_hub(args.run, args.hub, folder=args.dir, private=args.private,
                          registry=registry)
        print(f"pushed to {url}")
        return 0
    if args.dir is None:
        raise NcpvaeError("name the folder to write (`ncpvae export RUN DIR`) or a Hub "
                          "repository (`--hub REPO_ID`)")
    out = export_run(args.run, args.dir, overwrite=args.overwrite, registry=registry)
    print(f"run exported to {out}; load it with ncpvae.open_run('{out}')")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    manager = _manager(args)
    rows = [(p.name, p.source, p.version, ", ".join(f"{k}:{n}" for k, n in p.components) or "-")
            for p in manager.plugins]
    _print_table(("plugin", "source", "version", "components"), rows)
    return 0  # failures were shown as warnings when the plugins were loaded


def cmd_list(args: argparse.Namespace) -> int:
    from ncpvae.kinds import KINDS

    registry = _manager(args).registry
    kinds = [args.kind] if args.kind else list(KINDS)
    rows = []
    for kind in kinds:
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            doc = (cls.__doc__ or "").strip().splitlines()
            rows.append((kind, name, registry.source(kind, name), doc[0] if doc else ""))
    _print_table(("kind", "name", "plugin", "summary"), rows)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    registry = _manager(args).registry
    cls = registry.get(args.kind, args.name)
    print(f"{args.kind} '{args.name}' ({cls.__module__}.{cls.__qualname__}), "
          f"from plugin '{registry.source(args.kind, args.name)}'")
    doc = (cls.__doc__ or "").strip()
    if doc:
        print(f"\n{doc}\n")
    rows = []
    for field_name, field in cls.Config.model_fields.items():
        if field_name == "name":
            continue
        default = ("(required)" if field.is_required()
                   else field.get_default(call_default_factory=True))
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        bounds = ", ".join(str(m) for m in field.metadata
                           if type(m).__module__.startswith("annotated_types"))
        rows.append((field_name, annotation.replace("typing.", ""), _short(default),
                     bounds, field.description or ""))
    if rows:
        _print_table(("field", "type", "default", "bounds", "description"), rows)
    capabilities = cls.capabilities()
    if capabilities:
        print("\ncapabilities: " + ", ".join(f"{k}={v}" for k, v in capabilities.items()))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from ncpvae.config import run_config_schema

    print(json.dumps(run_config_schema(_manager(args).registry), indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ncpvae.config import config_to_toml, load_config

    config = load_config(args.config, args.overrides, _manager(args).registry)
    print(config_to_toml(config), end="")
    return 0


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else \
        [len(h) for h in header]
    for line in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())


COMMANDS = {"train": cmd_train, "aggregate": cmd_aggregate, "resume": cmd_resume, "fit-prior": cmd_fit_prior,
            "sample": cmd_sample, "evaluate": cmd_evaluate, "compare-priors": cmd_compare_priors,
            "embed": cmd_embed, "export": cmd_export, "plugins": cmd_plugins,
            "list": cmd_list, "describe": cmd_describe,
            "schema": cmd_schema, "validate": cmd_validate}


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """Show a warning as one line on stderr, without Python's source-line echo."""
    text = " ".join(str(message).split())
    print(f"ncpvae: warning: {text}", file=file if file is not None else sys.stderr)


def _quiet_rank() -> contextlib.AbstractContextManager:
    """Under torchrun, ranks > 0 print nothing on stdout (rank 0 speaks for the run)."""
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK", "0") not in ("", "0"):
        return contextlib.redirect_stdout(io.StringIO())
    return contextlib.nullcontext()


#: commands that write the run directory named by their RUN argument (train: see cmd_train)
_RUN_WRITERS = ("resume", "fit-prior", "sample", "evaluate", "compare-priors")


def _writer_lock(args: argparse.Namespace, run: str | None = None, *,
                 create: bool = False) -> contextlib.AbstractContextManager:
    """Hold the writer lock of the run a command writes (:mod:`ncpvae.run.lock`; a second writer
    is refused), in the process that writes it: under torchrun rank 0 alone."""
    run = run if run is not None else args.run if args.command in _RUN_WRITERS else None
    if run is None:
        return contextlib.nullcontext()
    from ncpvae.run.distributed import env_rank
    from ncpvae.run.lock import command_line, hold

    if env_rank() != 0:
        return contextlib.nullcontext()
    return hold(run, command=command_line(args.argv), create=create)


def _report(exc: BaseException) -> bool:
    """False on a rank > 0 for an error every rank raised (rank 0 prints it once)."""
    module = sys.modules.get("ncpvae.run.distributed")
    return module is None or module.should_report(exc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the lock names its holder by it
    import warnings

    previous_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        with _quiet_rank(), _writer_lock(args):
            return COMMANDS[args.command](args)
    except NcpvaeError as exc:
        if args.debug:
            raise
        if _report(exc):
            print(f"ncpvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused: an unwritable --out, a full disk, ...
        if args.debug:
            raise
        where = f" '{exc.filename}'" if exc.filename else ""
        reason = exc.strerror or " ".join(str(exc).split())
        print(f"ncpvae {args.command}: error: cannot write or read{where}: {reason}; choose "
              "another path or fix its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        message = str(exc) or "interrupted; files already written are complete"
        print(f"ncpvae {args.command}: {message}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous_showwarning
        if "ncpvae.run.distributed" in sys.modules:  # leave a torchrun process group
            sys.modules["ncpvae.run.distributed"].teardown()


if __name__ == "__main__":
    sys.exit(main())
