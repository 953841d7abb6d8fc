"""python -m sigwake_client [--socket PATH] [--timeout S] {list,ping}

Prints the agent's answer as JSON on stdout. Exit status: 0 on success,
1 when the agent answered with an error, 2 for usage errors, 3 when the
agent could not be reached.
"""
import argparse
import json
import sys

from . import AgentUnavailable, Client, SigwakeError, default_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sigwake_client", description="Talk to the sigwake agent's registration socket."
    )
    parser.add_argument("--socket", metavar="PATH", default=None, help="socket path (default: %s)" % default_path())
    parser.add_argument("--timeout", metavar="S", type=float, default=5.0, help="seconds per socket operation (default: 5)")
    parser.add_argument("command", choices=["list", "ping"], help="list: the actors you could signal; ping: the agent's version")
    args = parser.parse_args(argv)
    try:
        with Client(args.socket, args.timeout) as client:
            result = client.list() if args.command == "list" else client.ping()
    except SigwakeError as exc:
        print("sigwake: %s" % exc, file=sys.stderr)
        return 1
    except AgentUnavailable as exc:
        print("sigwake: %s" % exc, file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
