"""Every kvctl error is one line on stderr and a non-zero exit; never a traceback.

Commands raise :class:`CliError` (or let a ``kvcached.control`` error through);
:func:`guard` turns those, Typer's usage errors and anything unexpected into
``kvctl <command>: <what is wrong> (<what is allowed>)``. This module does not import
Typer, so the fast path of ``kvctl ls`` (:mod:`kvctl.main`) can use it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["COMMAND_NAMES", "EXIT_ERROR", "EXIT_USAGE", "CliError", "guard", "report", "take_segment"]

EXIT_ERROR = 1
EXIT_USAGE = 2
COMMAND_NAMES = ("ls", "top", "limit", "budget", "set", "rebalance", "launch", "doctor", "demo")


class CliError(Exception):
    """A user-facing failure: ``message`` is the one line shown."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _control_hint(exc: Exception) -> str:
    # The library's messages say what is wrong; add what the user can do about it.
    from kvcached import control

    if isinstance(exc, control.SegmentMissing):
        return "start an engine with `kvctl launch -- CMD` or try `kvctl demo`; KVCACHED_SHM_NAME or --segment picks another segment"
    if isinstance(exc, control.UnknownGpu):
        return "give a GPU index or UUID prefix shown by `kvctl ls`"
    if isinstance(exc, control.SegmentVersionError):
        return "stop the engines of the other kvcached version, or use another KVCACHED_SHM_NAME"
    return ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def report(message: str, argv: Sequence[str] = ()) -> None:
    """Write ``kvctl <command>: <message>`` as one line on stderr."""
    words = [a for a in argv if a in COMMAND_NAMES]
    prefix = f"kvctl {words[0]}" if words else "kvctl"
    sys.stderr.write(f"{prefix}: {_one_line(message)}\n")
    sys.stderr.flush()


def take_segment(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """Remove the global ``--segment NAME`` (before the command word) from ``argv``.

    Handled here rather than as a Typer option so that ``kvctl --segment NAME ls`` can take
    the fast path (:mod:`kvctl.main`); Typer also builds a pydantic validator for every
    option it processes, which alone costs more than the rest of ``kvctl ls``.

    Raises:
        CliError: ``--segment`` without a name.
    """
    rest: list[str] = []
    segment = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in COMMAND_NAMES or arg == "--":
            rest += [arg, *args]
            break
        if arg == "--segment":
            if not args or args[0].startswith("-"):
                raise CliError(
                    "--segment needs a segment NAME (the one `kvctl demo` printed, or a KVCACHED_SHM_NAME)", EXIT_USAGE
                )
            segment = args.pop(0)
        elif arg.startswith("--segment="):
            segment = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, segment


def _click_exit(exc: BaseException, argv: Sequence[str]) -> int | None:
    """The exit code for a Typer/click exception (reported), or None if it is not one."""
    if "typer" not in sys.modules:
        return None  # nothing imported Typer, so nothing raised its exceptions
    import typer

    try:  # Typer 0.2x vendors click as typer._click; older releases use the click package.
        from typer._click.exceptions import ClickException, UsageError
    except ImportError:
        from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]
    if isinstance(exc, UsageError):
        usage = exc.ctx.get_usage().replace("Usage: ", "", 1).strip() if exc.ctx else "kvctl --help"
        report(f"{exc.format_message()} (usage: {_one_line(usage)})", argv)
        return EXIT_USAGE
    if isinstance(exc, ClickException):
        report(exc.format_message(), argv)
        return int(exc.exit_code)
    if isinstance(exc, typer.Abort):
        return 130
    return None


def guard(call: Callable[[list[str]], Any], argv: Sequence[str]) -> int:
    """Take ``--segment`` off ``argv``, run ``call(argv)`` and return its exit code,
    reporting any error in one line."""
    from kvctl import ctl

    args = list(argv)
    try:
        args, segment = take_segment(args)
        ctl.set_segment(segment)
        code = call(args)
    except CliError as exc:
        report(str(exc), args)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (`kvctl ls | head`): nothing to say
        code = EXIT_ERROR
    except Exception as exc:
        code = _click_exit(exc, args)
        if code is None:
            from kvcached import control, envs

            if isinstance(exc, (control.ControlError, envs.EnvError)):
                hint = _control_hint(exc)
                report(f"{exc} ({hint})" if hint else str(exc), args)
            else:
                report(f"internal error: {type(exc).__name__}: {exc} (please report this)", args)
            code = EXIT_ERROR
    return code if isinstance(code, int) else 0
