"""The `kc` command line.

Each subcommand lives in its own module and is imported only when it runs,
so `kc --help` does not import TensorFlow.
"""

import importlib
import logging
import os
import sys

import click

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

# Subcommand name -> "module:attribute" of its click command.
COMMANDS = {
    "data": "kc_keras.cli.data_cmd:data",
    "teachers": "kc_keras.cli.teachers_cmd:teachers",
    "distill": "kc_keras.cli.distill_cmd:distill",
    "tflite": "kc_keras.cli.tflite_cmd:tflite",
    "bench": "kc_keras.cli.bench_cmd:bench",
}


class InputError(click.ClickException):
    """A `KCError` or `TFLiteError` shown as one line, exit code 2."""

    exit_code = 2


class LazyGroup(click.Group):
    """A click group that imports each subcommand on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, cmd_name):
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx):
        # Errors the user can fix become one line on stderr and exit code 2;
        # anything else is a bug and keeps its traceback.
        from mobile_demo.benchmark import TFLiteError

        try:
            return super().invoke(ctx)
        except (KCError, TFLiteError) as error:
            raise InputError(str(error)) from error
        except click.UsageError as error:
            # click would print the whole usage block before the message.
            # One line with the message and a pointer to --help is enough.
            command = error.ctx.command_path if error.ctx else ctx.info_name
            message = error.format_message().rstrip(".")
            separator = " " if message.endswith("?") else "; "
            raise InputError(
                f"{message}{separator}see `{command} --help` for the options"
            ) from error


def configure_logging(verbose):
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose):
    """Concentrate many specialist models into one small student."""
    configure_logging(verbose)


def main():
    cli()


if __name__ == "__main__":
    main()
