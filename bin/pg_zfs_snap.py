#!/usr/bin/env python3
"""Take consistent, self-describing snapshot sets of a PostgreSQL standby.

Wired in as (root's crontab on the guest):

    1 4 * * * /opt/pg_zfs/bin/pg_zfs_snap.py

Config (default /etc/pg_zfs/pg_zfs.conf, or -c, or $PG_ZFS_CONFIG):
    [postgres] pgdata, bindir, user, host, port, dbname
    [snapshot] backend, datasets, prefix, keep_hourly, keep_daily,
               keep_weekly, keep_monthly, lock_file, warn_age, crit_age

Exit codes:
    0  done
    1  a snapshot set or a prune failed (nothing half made is left)
    2  bad arguments or bad config
"""

import argparse
import configparser
import logging
import os
import subprocess
import sys

VERSION = "0.1.0"
PROG = "pg_zfs_snap"
DEFAULT_CONFIG = "/etc/pg_zfs/pg_zfs.conf"

log = logging.getLogger(PROG)


# ---------------------------------------------------------------------------
# The helpers every pg_zfs script carries (config, logging, commands).
# Each script is one self-contained file, so these few lines are repeated in
# all four on purpose; keep them alike when you change one.
# ---------------------------------------------------------------------------

class Failure(Exception):
    """An error for the operator: one line of text and the exit code to end on."""

    def __init__(self, message, code=1):
        Exception.__init__(self, message)
        self.code = code


class Config(object):
    """The pg_zfs INI file, read with typed getters whose errors name the key.

    Every error is a Failure with exit code 2 whose message reads
    ``FILE: [section] key: what is wrong``.
    """

    REQUIRED = object()

    def __init__(self, path, parser):
        self.path = path
        self.parser = parser

    @classmethod
    def load(cls, path):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path) as config_file:
                parser.read_file(config_file)
        except (OSError, IOError) as error:
            raise Failure("%s: cannot read config file: %s" % (path, error.strerror or error), 2)
        except configparser.Error as error:
            raise Failure("%s: %s" % (path, " ".join(str(error).split())), 2)
        return cls(path, parser)

    def error(self, section, key, message):
        return Failure("%s: [%s] %s: %s" % (self.path, section, key, message), 2)

    def has_section(self, section):
        return self.parser.has_section(section)

    def str(self, section, key, default=REQUIRED):
        if self.parser.has_option(section, key):
            return self.parser.get(section, key).strip()
        if default is Config.REQUIRED:
            raise self.error(section, key, "missing (required)")
        return default

    def int(self, section, key, default=REQUIRED, minimum=0):
        text = self.str(section, key, default if default is Config.REQUIRED else str(default))
        try:
            value = int(text)
        except ValueError:
            raise self.error(section, key, "%r is not a whole number" % text)
        if value < minimum:
            raise self.error(section, key, "%d is below the minimum %d" % (value, minimum))
        return value

    def choice(self, section, key, choices, default=REQUIRED):
        value = self.str(section, key, default)
        if value not in choices:
            raise self.error(section, key, "%r is not one of %s" % (value, ", ".join(choices)))
        return value

    def list(self, section, key, default=REQUIRED):
        return self.str(section, key, default).split()


def config_path(option):
    """The config file to read: -c/--config, else $PG_ZFS_CONFIG, else the default."""
    return option or os.environ.get("PG_ZFS_CONFIG") or DEFAULT_CONFIG


def setup_logging(verbose=False, use_syslog=False):
    """Log to stderr (PostgreSQL and cron keep it) and, if asked, to syslog."""
    logger = logging.getLogger(PROG)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(PROG + ": %(levelname)s: %(message)s"))
    logger.handlers = [stderr]
    if use_syslog and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler
        handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(PROG + "[%(process)d]: %(message)s"))
        logger.addHandler(handler)
    return logger


def run(argv, timeout=None, input_text=None, check=True):
    """Run argv (a list, never a shell string); return (exit code, stdout, stderr).

    A missing program or a timeout is a Failure with exit code 1; so is a
    non-zero exit when check is true, with the command's last stderr line.
    """
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True)
    except OSError as error:
        raise Failure("cannot run %s: %s" % (argv[0], error.strerror or error), 1)
    try:
        out, err = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise Failure("%s did not finish within %s s" % (" ".join(argv), timeout), 1)
    if check and proc.returncode != 0:
        last = (err.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        raise Failure("%s failed: %s" % (" ".join(argv[:3]), last), 1)
    return proc.returncode, out, err


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="config file (default: $PG_ZFS_CONFIG or %s)" % DEFAULT_CONFIG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        Config.load(config_path(args.config))
    except Failure as failure:
        log.error("%s", failure)
        return failure.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
