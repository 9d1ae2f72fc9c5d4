#!/usr/bin/env python3
"""Turn a `make install DESTDIR=TREE PREFIX=/usr` tree into a Debian package.

    python3 tools/mkdeb.py --version VERSION TREE OUTDIR

(`make deb` runs both.) Writes OUTDIR/pg-zfs_VERSION-RELEASE_all.deb with
dpkg-deb alone (no debhelper, no build-essential): man pages gzipped as
Debian wants them, /usr/share/doc/pg-zfs/changelog.Debian.gz and copyright,
DEBIAN/control, conffiles (every file under /etc: the config is never
overwritten by an upgrade), md5sums, and postinst/postrm that make a running
systemd read the units (none is enabled: cron or the timer is the admin's
choice). Summary, description, license, maintainer, dependencies and the
changelog come from packaging/pg_zfs.spec, so the two packages say the same;
VERSION must be the spec's Version. Files are root's, directories 0755,
files 0644, /usr/bin and the maintainer scripts 0755. Debian's package name
is pg-zfs (an underscore is not allowed there). Stdlib only, Python 3.6+.
"""

import argparse
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(REPO, "packaging", "pg_zfs.spec")
PACKAGE = "pg-zfs"
# RPM names of what the spec requires, as Debian calls them.
DEBIAN_NAMES = {"openssh-clients": "openssh-client"}
# A running systemd must re-read unit files that arrive, change or go.
RELOAD_SYSTEMD = """#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
"""


class SpecError(Exception):
    pass


def read_spec(path):
    """{tag: value} of the spec's preamble, plus "description" and "changelog"
    (the text of those sections), with %{name}/%{version} expanded."""
    fields, section, texts = {}, None, {"description": [], "changelog": []}
    for line in open(path, encoding="utf-8").read().splitlines():
        match = re.match(r"^%(\w+)\b", line)
        if match and not line.startswith(("%global", "%{", "%dir", "%config", "%doc")):
            section = match.group(1)
            continue
        if section is None:
            tag = re.match(r"^([A-Za-z]\w*):\s*(.*)$", line)
            if tag:
                fields.setdefault(tag.group(1).lower(), tag.group(2).strip())
        elif section in texts:
            texts[section].append(line)
    for name in ("name", "version", "release", "summary", "license", "packager"):
        if name not in fields:
            raise SpecError("%s: no %s" % (path, name.capitalize()))
    fields["release"] = fields["release"].replace("%{?dist}", "")
    for name, lines in texts.items():
        fields[name] = "\n".join(lines).strip("\n")
    return fields


def debian_relations(value):
    """An RPM Requires/Recommends list ("a, b" or "a b") in Debian's names."""
    names = [name for name in re.split(r"[,\s]+", value or "") if name]
    return ", ".join(DEBIAN_NAMES.get(name, name) for name in names)


def debian_changelog(changelog):
    """The spec's %changelog entries in Debian's changelog format."""
    entries = []
    for block in re.split(r"\n(?=\* )", changelog.strip()):
        lines = block.splitlines()
        head = re.match(r"^\* (\w{3}) (\w{3}) +(\d+) (\d{4}) (.+?) - (\S+)$", lines[0])
        if not head:
            raise SpecError("%%changelog: cannot read %r" % lines[0])
        weekday, month, day, year, who, version = head.groups()
        items = []
        for line in lines[1:]:
            if line.startswith("- "):
                items.append("  * " + line[2:])
            elif line.strip():
                items.append("    " + line.strip())
        entries.append("%s (%s) unstable; urgency=medium\n\n%s\n\n -- %s  %s, %02d %s %s 00:00:00 +0000\n"
                       % (PACKAGE, version, "\n".join(items), who, weekday, int(day), month, year))
    return "\n".join(entries)


def control_text(spec, installed_kib):
    description = []
    for paragraph in spec["description"].split("\n\n"):
        description += [" " + line for line in paragraph.splitlines()] + [" ."]
    fields = [
        ("Package", PACKAGE),
        ("Version", "%s-%s" % (spec["version"], spec["release"])),
        ("Architecture", "all"),
        ("Maintainer", spec["packager"]),
        ("Installed-Size", str(installed_kib)),
        ("Depends", debian_relations(spec.get("requires"))),
        ("Recommends", debian_relations(spec.get("recommends"))),
        ("Section", "database"),
        ("Priority", "optional"),
        ("Description", spec["summary"] + "\n" + "\n".join(description[:-1])),
    ]
    return "".join("%s: %s\n" % (name, value) for name, value in fields if value)


def gzip_file(path, target):
    """gzip -9n: no name, no time in the header, so a rebuild gives the same bytes."""
    with open(path, "rb") as source, open(target, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as packed:
            shutil.copyfileobj(source, packed)


def write(path, text, mode):
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(path, mode)


def build(tree, out_dir, version):
    spec = read_spec(SPEC)
    if spec["version"] != version:
        raise SpecError("%s: Version %s, but the scripts say %s" % (SPEC, spec["version"], version))
    for top, _, names in os.walk(os.path.join(tree, "usr", "share", "man")):
        for name in names:
            if not name.endswith(".gz"):
                gzip_file(os.path.join(top, name), os.path.join(top, name + ".gz"))
                os.remove(os.path.join(top, name))
    doc = os.path.join(tree, "usr", "share", "doc", PACKAGE)
    os.makedirs(doc, exist_ok=True)
    write(os.path.join(doc, "changelog.Debian"), debian_changelog(spec["changelog"]), 0o644)
    gzip_file(os.path.join(doc, "changelog.Debian"), os.path.join(doc, "changelog.Debian.gz"))
    os.remove(os.path.join(doc, "changelog.Debian"))
    write(os.path.join(doc, "copyright"),
          "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
          "Upstream-Name: %s\n\nFiles: *\nCopyright: %s\nLicense: %s\n"
          % (spec["name"], spec["packager"], spec["license"]), 0o644)
    control = os.path.join(tree, "DEBIAN")
    shutil.rmtree(control, ignore_errors=True)
    os.mkdir(control)
    conffiles, sums, size = [], [], 0
    for top, dirs, names in os.walk(tree):
        dirs[:] = sorted(name for name in dirs if os.path.join(top, name) != control)
        os.chmod(top, 0o755)
        for name in sorted(names):
            path = os.path.join(top, name)
            relative = os.path.relpath(path, tree)
            executable = relative.startswith("usr/bin/")
            os.chmod(path, 0o755 if executable else 0o644)
            with open(path, "rb") as content:
                sums.append("%s  %s\n" % (hashlib.md5(content.read()).hexdigest(), relative))
            size += os.path.getsize(path)
            if relative.startswith("etc/"):
                conffiles.append("/" + relative + "\n")
    write(os.path.join(control, "control"), control_text(spec, (size + 1023) // 1024), 0o644)
    write(os.path.join(control, "conffiles"), "".join(conffiles), 0o644)
    write(os.path.join(control, "md5sums"), "".join(sums), 0o644)
    write(os.path.join(control, "postinst"), RELOAD_SYSTEMD, 0o755)
    write(os.path.join(control, "postrm"), RELOAD_SYSTEMD, 0o755)
    os.chmod(control, 0o755)
    target = os.path.join(out_dir, "%s_%s-%s_all.deb" % (PACKAGE, spec["version"], spec["release"]))
    started = time.time()
    subprocess.check_call(["dpkg-deb", "--root-owner-group", "--build", tree, target])
    print("mkdeb: %s (%.1fs)" % (target, time.time() - started))
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", metavar="TREE", help="make install DESTDIR")
    parser.add_argument("out_dir", metavar="OUTDIR")
    parser.add_argument("--version", required=True, help="VERSION of bin/*.py")
    args = parser.parse_args(argv)
    try:
        build(args.tree, args.out_dir, args.version)
    except (SpecError, OSError, subprocess.CalledProcessError) as error:
        sys.stderr.write("mkdeb: %s\n" % error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
