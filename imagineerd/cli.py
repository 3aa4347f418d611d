"""The ``imagineerd`` command: serve, generate, token, smb-conf, pull, db, make-test-model,
make-test-lora, make-test-embedding, make-test-vae."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import ImagineerdError

log = logging.getLogger("imagineerd")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # diffusers/transformers are chatty at INFO; their warnings still show.
    for noisy in ("diffusers", "transformers", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # The pool warns at every failed reconnect while the database is away; the node logs
    # the outage once itself (and its return).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def security_warnings(host: str, token: str) -> list[str]:
    """What a start-up on these settings should warn about (logged, never fatal)."""
    if token or _is_loopback(host):
        return []
    return [
        f"listening on {host} without a token (server.auth_token): anyone who can reach "
        "this machine can queue jobs, stop them, read the gallery and change the "
        "generation settings. Run `imagineerd token` and put the line it prints into "
        "config.yaml, or set server.host: 127.0.0.1"
    ]


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .daemon import Daemon
    from .http.app import auth_token
    from .http.server import HttpService

    config = config_mod.load(args.config)
    if args.host:
        config.data["server"]["host"] = args.host
    if args.port:
        config.data["server"]["port"] = args.port
    server = config["server"]
    for warning in security_warnings(server["host"], auth_token(config)):
        log.warning(warning)
    daemon = Daemon(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info(
            "received %s; stopping (a running job goes back to the queue)",
            signal.Signals(signum).name,
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The port is bound before anything starts, so a port in use is one clear line and
    # not a half-started daemon.
    try:
        services: list = [HttpService(daemon, config)]
    except OSError as exc:
        daemon.store.close()
        where = f"{server['host']}:{server['port']}"
        if exc.errno == errno.EADDRINUSE:
            raise ImagineerdError(
                f"port {server['port']} is already in use on {server['host']} (another "
                "imagineerd, or another program); stop it, or choose another port with "
                "--port or server.port in config.yaml"
            ) from None
        raise ImagineerdError(
            f"cannot listen on {where}: {exc.strerror or exc}; check server.host and "
            "server.port in config.yaml (ports below 1024 need root)"
        ) from None
    if config["inbox"]["enabled"]:
        from .inbox import Inbox

        # Made before start-up recovery runs, so the receipts of inbox jobs that recovery
        # finishes are brought up to date too.
        services.append(Inbox(daemon, config))
    daemon.start()
    for service in services:
        service.start()
    log.info("imagineerd %s serving; config %s", __version__, config.path)
    stop.wait()
    for service in reversed(services):
        service.stop()
    daemon.stop()
    if daemon.supervisor is not None and daemon.supervisor.stuck():
        # A worker is stuck in the backend's native code (a driver hang): the interpreter's
        # own teardown would abort under it, so the process ends here, its state saved.
        log.error("stopped, leaving a worker stuck in the backend")
        logging.shutdown()
        os._exit(1)
    log.info("stopped cleanly")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from . import jobs
    from .daemon import Daemon
    from .jobs import COMPLETED

    config = config_mod.load(args.config)
    request: dict = {"prompt": args.prompt}
    for name in jobs.PARAMETERS[1:]:  # every job field but the prompt
        value = getattr(args, name, None)  # not every job field has a command-line option
        if value is not None:
            request[name] = value
    for name in ("init_image", "mask"):  # local files: their bytes are the image
        if name in request:
            try:
                request[name] = Path(request[name]).read_bytes()
            except OSError as exc:
                flag = "--" + name.replace("_", "-")
                raise ImagineerdError(f"{flag}: {exc.strerror}: {exc.filename}") from None
    if "hires" in request:
        request["hires"] = {"scale": request["hires"]}
    daemon = Daemon(config)
    spec = daemon.validate(request)  # before the queue, so a typo costs no model load
    daemon.start(workers=False)
    from .worker import Worker

    worker = Worker(daemon, device=daemon.devices()[0])
    job = daemon.submit_spec(spec, source="cli")
    # Run the queue in this process until our job is done (jobs queued before it run first,
    # exactly as the server would run them).
    while True:
        claimed = daemon.store.claim_next(started_at=daemon.now_iso())
        if claimed is None:
            break
        worker.process([claimed])
        if claimed.id == job.id:
            break
    daemon.drain_saves()
    done = daemon.job(job.id)
    daemon.stop()
    if done.status != COMPLETED:
        print(f"job {done.id} {done.status}: {done.error or ''}", file=sys.stderr)
        return 1
    print(done.output_path)
    return 0


def cmd_smb_conf(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .smb import smb_conf

    config = config_mod.load(args.config)
    print(smb_conf(config, guest=args.guest, user=args.user, share=args.share), end="")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """A new random token on the first line (``$(imagineerd token | head -1)`` takes it),
    then the config line that enables it."""
    token = secrets.token_urlsafe(32)  # 256 bits, URL- and YAML-safe characters only
    print(token)
    print()
    print("# under server: in config.yaml (or IMAGINEERD_AUTH_TOKEN in the environment),")
    print("# then restart imagineerd:")
    print(f'  auth_token: "{token}"')
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    target = Path(args.directory)
    if target.suffix.lower() in (".safetensors", ".ckpt"):
        from .backends.test_files import make_test_checkpoint

        path = make_test_checkpoint(target, arch=args.arch, seed=args.seed)
        print(
            f"wrote a tiny {args.arch} checkpoint to {path} ({path.stat().st_size / 1e6:.1f} MB); "
            "put it into the models folder's checkpoints/ to choose it by name"
        )
        return 0
    from .backends.testmodel import make_test_model

    path = make_test_model(
        target,
        arch=args.arch,
        full_size=args.full_size,
        real_tokenizer=args.real_tokenizer,
        seed=args.seed,
    )
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    print(
        f"wrote {'full-size' if args.full_size else 'tiny'} {args.arch} test model to {path} "
        f"({size / 1e6:.1f} MB); set model.name to this folder in config.yaml"
    )
    return 0


def cmd_make_test_file(args: argparse.Namespace) -> int:
    """make-test-lora, make-test-embedding, make-test-vae: one tiny file of that kind."""
    from .backends import test_files

    make = getattr(test_files, f"make_test_{args.kind}")
    path = make(Path(args.path), arch=args.arch, seed=args.seed)
    folder = {"lora": "loras", "embedding": "embeddings", "vae": "vae"}[args.kind]
    print(
        f"wrote a tiny {args.arch} {args.kind} to {path}; put it into the models folder's "
        f"{folder}/ to use it"
    )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a model from the Hugging Face hub into paths.models (see imagineerd.pull)."""
    from . import config as config_mod
    from .pull import pull

    pull(args.source, config_mod.load(args.config), revision=args.revision, into=args.into)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create the job database's schema, or bring it to this version (as every start does);
    for a deployment that prepares the database before the nodes start."""
    from . import config as config_mod
    from .stores import open_store

    try:
        store = open_store(config_mod.load(args.config))
        try:
            where = getattr(store, "where", None) or str(getattr(store, "path", ""))
            version = store.schema_version()
        finally:
            store.close()
    except ImagineerdError as exc:
        print(f"imagineerd: error: {exc.message}", file=sys.stderr)
        return 1
    print(f"the job database {where} is at schema version {version}")
    return 0


def cmd_db_copy(args: argparse.Namespace) -> int:
    """Copy the whole queue of an SQLite job database into the configured PostgreSQL one."""
    from . import config as config_mod
    from .pg_store import PostgresStore
    from .stores import is_postgres

    source = args.source
    if not source.startswith("sqlite:") or not source[len("sqlite:") :].strip():
        print(
            f"imagineerd: error: --from must be sqlite:PATH (the SQLite job database, e.g. "
            f"sqlite:state/imagineerd.db); got {source!r}",
            file=sys.stderr,
        )
        return 1
    # A command-line path: relative to where the command runs, as any other argument.
    path = Path(source[len("sqlite:") :].strip()).expanduser()
    try:
        url = config_mod.load(args.config)["queue"]["database"]
        if not is_postgres(url):
            # Checked before anything is opened: opening the configured SQLite store would
            # create or migrate a file, which may be the very source of the copy.
            print(
                "imagineerd: error: queue.database must name the PostgreSQL database to copy "
                "into (postgresql://...); it names an SQLite one",
                file=sys.stderr,
            )
            return 1
        store = PostgresStore(url)
    except ImagineerdError as exc:
        print(f"imagineerd: error: {exc.message}", file=sys.stderr)
        return 1
    try:
        counts = store.copy_from_sqlite(path)
    except ImagineerdError as exc:
        print(f"imagineerd: error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(
        f"copied {counts['jobs']} jobs, {counts['claims']} inbox claims, "
        f"{counts['deliveries']} webhook deliveries and {counts['settings']} settings "
        f"from {path} into {store.where}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagineerd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imagineerd {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon: workers, HTTP API and UI, inbox")
    serve.add_argument("--config", default="config.yaml", help="config file (default: %(default)s)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate one image in this process; prints its path")
    gen.add_argument("prompt")
    gen.add_argument("--config", default="config.yaml")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    gen.add_argument("--negative-prompt", dest="negative_prompt")
    gen.add_argument("--scheduler", help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, ...")
    gen.add_argument("--model", help="a checkpoint name as GET /api/models lists it")
    gen.add_argument(
        "--lora",
        dest="loras",
        action="append",
        metavar="NAME[:WEIGHT]",
        help="apply a LoRA (weight 1 if omitted); repeat for several",
    )
    gen.add_argument("--clip-skip", dest="clip_skip", type=int, help="1-12 (1: the last layer)")
    gen.add_argument("--vae", help="a VAE name as listed, or default (the checkpoint's own)")
    gen.add_argument(
        "--init-image", dest="init_image", metavar="PATH", help="start from this image (img2img)"
    )
    gen.add_argument("--strength", type=float, help="0-1: how much of the input is redrawn")
    gen.add_argument("--mask", metavar="PATH", help="repaint where this image is white")
    gen.add_argument("--mask-blur", dest="mask_blur", type=int, help="px, softens the seam")
    gen.add_argument(
        "--inpaint-area", dest="inpaint_area", choices=("whole", "masked"), help="A1111's area"
    )
    gen.add_argument(
        "--hires",
        metavar="SCALE",
        type=float,
        help="A1111's hires fix: generate, upscale by SCALE, refine (text-to-image)",
    )
    gen.set_defaults(func=cmd_generate)

    smb = sub.add_parser("smb-conf", help="print Samba share sections for this install")
    smb.add_argument("--config", default="config.yaml")
    smb.add_argument(
        "--guest",
        action="store_true",
        help="let anyone connect without a password (default: valid users only)",
    )
    smb.add_argument("--user", help="account the inbox share writes as (default: you)")
    smb.add_argument("--share", default="Imagineer", help="share name (default: %(default)s)")
    smb.set_defaults(func=cmd_smb_conf)

    token = sub.add_parser(
        "token", help="print a new random token for server.auth_token (and the config line)"
    )
    token.set_defaults(func=cmd_token)

    tm = sub.add_parser(
        "make-test-model",
        help="write a random-weight SD1.5/SDXL pipeline (for tests, benchmarks): a diffusers "
        "folder, or with a .safetensors/.ckpt name a tiny single-file checkpoint",
    )
    tm.add_argument("directory", help="a folder, or a .safetensors/.ckpt file name")
    tm.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    tm.add_argument(
        "--full-size",
        action="store_true",
        help="the real architecture (GB of random weights) instead of a tiny one",
    )
    tm.add_argument(
        "--real-tokenizer",
        action="store_true",
        help="the real CLIP tokenizer (shipped in the package), not a generated byte-level one",
    )
    tm.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tm.set_defaults(func=cmd_make_test_model)
    for kind, what in (
        ("lora", "a tiny LoRA in kohya's format"),
        ("embedding", "a tiny textual-inversion embedding in A1111's format"),
        ("vae", "a tiny VAE as one file"),
    ):
        tf = sub.add_parser(f"make-test-{kind}", help=f"write {what} (for tests)")
        tf.add_argument("path", help="the file to write, e.g. models/loras/test.safetensors")
        tf.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
        tf.add_argument("--seed", type=int, default=0, help="seed of the random weights")
        tf.set_defaults(func=cmd_make_test_file, kind=kind)

    pl = sub.add_parser(
        "pull", help="download a model from the Hugging Face hub into the models folder"
    )
    pl.add_argument(
        "source",
        metavar="OWNER/REPO[/FILE.safetensors]",
        help="a diffusers pipeline repo, or one single-file model in a repo",
    )
    pl.add_argument("--config", default="config.yaml", help="config file (default: %(default)s)")
    pl.add_argument("--revision", help="branch, tag or commit (default: main)")
    pl.add_argument(
        "--into",
        choices=("loras", "embeddings", "vaes"),
        help="for one file: the folder it goes into (default: checkpoints)",
    )
    pl.set_defaults(func=cmd_pull)

    db = sub.add_parser("db", help="the job database (queue.database): upgrade, copy")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser(
        "upgrade", help="create the job database's tables or bring them to this version"
    )
    up.add_argument("--config", default="config.yaml", help="config file (default: %(default)s)")
    up.set_defaults(func=cmd_db_upgrade)
    cp = db_sub.add_parser(
        "copy",
        help="copy every job, inbox claim, webhook delivery and setting of an SQLite job "
        "database into the (empty) PostgreSQL database queue.database names",
    )
    cp.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="sqlite:PATH",
        help="the SQLite job database, e.g. sqlite:state/imagineerd.db (stop its daemon first)",
    )
    cp.add_argument("--config", default="config.yaml", help="config file (default: %(default)s)")
    cp.set_defaults(func=cmd_db_copy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except ImagineerdError as exc:
        print(f"imagineerd: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
