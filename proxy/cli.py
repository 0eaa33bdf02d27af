"""The `invoisx-proxy` command: a thin layer over `load_settings` and `create_app`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from proxy import __version__
from proxy.app import create_app
from proxy.config.configfile import ConfigFile
from proxy.config.keys import config_block, key_sha256, new_key
from proxy.config.settings import ConfigError, Settings, load_settings
from proxy.demo.command import run_demo, run_sandbox
from proxy.report import FAIL_ON, FORMATS, AuditError, audit_options, run_audit
from proxy.server.serving import bind, run_until_signalled, server_config, tune_gc
from proxy.stages.clients import ClientSpec

__all__ = ["main", "serve"]


def serve(settings: Settings, *, host_setting: str, port_setting: str) -> None:
    """Run the proxy under uvicorn until it is stopped; the settings name a bad address."""
    # Bound before uvicorn starts, so a port in use or a bad host stops start-up with one
    # line, before the app has logged `startup` (which then names the real port, even for 0).
    sock = bind(settings.host, settings.port, host_setting=host_setting, port_setting=port_setting)
    with sock:
        settings = settings.model_copy(update={"port": sock.getsockname()[1]})
        server = uvicorn.Server(server_config(create_app(settings), settings))
        tune_gc()
        run_until_signalled(server, sockets=[sock])


# The settings that `serve`'s flags override: a bad value is named as the user gave it.
_FLAG_SETTINGS = {
    "host": "INVOISX_PROXY_HOST",
    "port": "INVOISX_PROXY_PORT",
    "config": "INVOISX_PROXY_CONFIG",
}


def run_serve(args: argparse.Namespace) -> None:
    """`serve`: settings from the environment with the flags given, then the proxy."""
    given = {name: getattr(args, name) for name in _FLAG_SETTINGS}
    overrides = {name: value for name, value in given.items() if value is not None}
    names = {
        setting: f"--{name}" if name in overrides else setting
        for name, setting in _FLAG_SETTINGS.items()
    }
    host, port = names["INVOISX_PROXY_HOST"], names["INVOISX_PROXY_PORT"]
    try:
        serve(load_settings(**overrides), host_setting=host, port_setting=port)
    except ConfigError as error:
        message = str(error).removeprefix(f"{error.setting}: ")
        raise ConfigError(names.get(error.setting, error.setting), message) from None


def run_keys(args: argparse.Namespace) -> int:
    """`keys new`: a new key, shown once, and its config table; `keys hash`: a key's hash."""
    if args.keys_command == "hash":
        # A key copied from a client's configuration often comes with its header's scheme.
        key = sys.stdin.readline().strip()
        scheme, _, rest = key.partition(" ")
        if scheme.lower() == "bearer":
            key = rest.strip()
        if not key:
            raise ConfigError("keys hash", "no key on standard input")
        print(key_sha256(key))
        return 0
    try:
        spec = ClientSpec(key_sha256="0" * 64, permissions=args.permissions.split(","))
        ConfigFile(clients={args.name: spec})
    except ValidationError as error:
        message = str(error.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfigError("keys new", message) from None
    key = new_key()
    print(f"# The key for {args.name}: shown once, the proxy keeps only its hash.")
    print(key)
    print("\n# Add to the config file (INVOISX_PROXY_CONFIG):")
    print(config_block(args.name, key, spec.permissions), end="")
    return 0


# `audit`: a report of token usage from the proxy's own log; options in proxy/report/options.py.
def _add_audit_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit",
        help="report token usage and unusual activity from audit logs",
        description="Token usage and unusual activity from the proxy's JSON-lines audit logs. "
        "Exit status 1 when a finding reaches --fail-on, 2 for a bad option or input.",
    )
    audit.add_argument("logs", nargs="*", metavar="LOG", help="log files, .gz too (default stdin)")
    audit.add_argument("--since", metavar="WHEN", help="ISO date/datetime (naive: MYT), or 24h, 7d")
    audit.add_argument("--until", metavar="WHEN", help="exclusive end; a date includes that day")
    audit.add_argument("--format", choices=FORMATS, help="text (default), json or csv")
    audit.add_argument("--fail-on", choices=FAIL_ON, help="exit 1 from this severity (high)")
    audit.add_argument("--business-hours", metavar="HH:MM-HH:MM", help="default 08:00-18:00")
    audit.add_argument("--business-days", metavar="DAYS", help="default mon-fri; or sun-thu, ...")
    audit.add_argument("--timezone", metavar="ZONE", help="of business hours (Asia/Kuala_Lumpur)")
    audit.add_argument("--burst-factor", type=float, metavar="X", help="times the median (5)")
    audit.add_argument("--burst-min", type=int, metavar="N", help="burst floor, per minute (30)")
    audit.add_argument("--refusals", type=int, metavar="N", help="refused calls per client (10)")


def run_audit_command(args: argparse.Namespace) -> int:
    """`audit`: exit 0, 1 when a finding reaches --fail-on, 2 for a bad option or input."""
    given = {
        "since": args.since,
        "until": args.until,
        "output": args.format,
        "fail_on": args.fail_on,
        "business_hours": args.business_hours,
        "business_days": args.business_days,
        "timezone": args.timezone,
        "burst_factor": args.burst_factor,
        "burst_min": args.burst_min,
        "refusals": args.refusals,
    }
    try:
        options = audit_options(
            **{name: value for name, value in given.items() if value is not None}
        )
        return run_audit(args.logs, options)
    except AuditError as error:
        print(f"invoisx-proxy: audit: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoisx-proxy",
        description="Authenticating reverse proxy for the InvoisX API (settings: INVOISX_*).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("serve", help="run the proxy (the default)")
    run.add_argument("--host", help="listen address (INVOISX_PROXY_HOST)")
    run.add_argument("--port", type=int, help="listen port (INVOISX_PROXY_PORT)")
    run.add_argument("--config", help="TOML rules file (INVOISX_PROXY_CONFIG)")
    demo = commands.add_parser("demo", help="the proxy in front of a local InvoisX sandbox")
    demo.add_argument("--host", default="127.0.0.1", help="proxy listen address (127.0.0.1)")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--tour", action="store_true", help="run the tour through it, then exit")
    demo.add_argument(
        "--log-file", metavar="PATH", help="keep the audit log, appended (INVOISX_PROXY_LOG_FILE)"
    )
    keys = commands.add_parser("keys", help="client keys for the config file")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="print a new key and its [clients.NAME] table")
    new.add_argument("name", help="the app's name, as audit lines and metrics will show it")
    new.add_argument("--permissions", required=True, help="comma list of create,read,update,delete")
    key_commands.add_parser("hash", help="read a key on stdin, print its key_sha256")
    _add_audit_parser(commands)
    sandbox = commands.add_parser("sandbox", help="only the local InvoisX sandbox")
    sandbox.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    sandbox.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    sandbox.add_argument(
        "--rate-limit", type=int, default=60, help="requests per minute per token, 0 = off"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.port, tour=args.tour, host=args.host, log_file=args.log_file)
        if args.command == "keys":
            return run_keys(args)
        if args.command == "audit":
            return run_audit_command(args)
        if args.command == "sandbox":
            run_sandbox(args.host, args.port, args.rate_limit)
            return 0
        run_serve(args)
    except ConfigError as error:
        print(f"invoisx-proxy: {error}", file=sys.stderr)
        return 2
    return 0
