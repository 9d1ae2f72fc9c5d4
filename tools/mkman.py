#!/usr/bin/env python3
"""Write the man pages of pg_zfs from the scripts themselves.

    python3 tools/mkman.py [--bindir DIR] [--docdir DIR] OUTDIR

writes OUTDIR/NAME.py.1 for each script of bin/ and OUTDIR/pg_zfs.conf.5.
What a page says about a command or a key comes from the scripts (only the
FILES and SEE ALSO lines are this tool's), so it cannot say what they do not:
  NAME.py(1)      the script's module docstring (its first paragraph is the
                  NAME line, the rest the DESCRIPTION), the usage and options
                  of its argparse parser (caught as parse_args builds it), its
                  DEFAULT_CONFIG and VERSION.
  pg_zfs.conf(5)  CONFIG_SCHEMA (every section, key and kind of value) and
                  the comment above it; each key's default and the scripts
                  that read it, from the scripts' config.str/int/... calls;
                  each key's words, from the comments above it in
                  etc/pg_zfs.conf.example.
--bindir replaces the scripts' own wiring path /opt/pg_zfs/bin where a page
shows it (a package installs them in /usr/bin); --docdir is where README.md
is installed (SEE ALSO). A call to the config that cannot be placed (a key
computed some new way) is a warning on stderr: tests/test_packaging.py
fails on any. Stdlib only, Python 3.6 to 3.13, no date in the pages (a
rebuild gives the same bytes).
"""

import argparse
import ast
import importlib.util
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("pg_wal_fetch", "pg_zfs_restore", "pg_zfs_snap", "setup_guest")
WIRING_BINDIR = "/opt/pg_zfs/bin"
# Sections a config has one of per NAME: [source NAME], [replica NAME].
NAMED_SECTIONS = ("replica", "source")
CONFIG_METHODS = ("str", "int", "choice", "list", "duration")
# Where a config call's default is among its positional arguments.
DEFAULT_INDEX = {"choice": 3}
REQUIRED = object()
COMPUTED = object()
DURATION_STEPS = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60))
MANUAL = "pg_zfs"


class OneOf(tuple):
    """A default chosen at run time between these values (`"ping" if host else "none"`)."""


class Unresolved(Exception):
    """An expression in a config call that this tool cannot evaluate."""


# ---------------------------------------------------------------------------
# roff
# ---------------------------------------------------------------------------

def roff_text(text):
    """text as roff input: backslashes, minus signs and quotes kept as typed
    (a copied `--check` or '%f %p' must still work), no line read as a request."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\e")
        elif char == "-":
            out.append("\\-")
        elif char == "'":
            out.append("\\(aq")
        elif char == "`":
            out.append("\\(ga")
        elif ord(char) > 126:
            out.append("\\[u%04X]" % ord(char))
        else:
            out.append(char)
    line = "".join(out)
    return "\\&" + line if line.startswith(".") else line


def roff_quoted(text):
    """An argument of a request (.TH, .SH): escaped, in double quotes."""
    return '"%s"' % roff_text(text).replace('"', '\\(dq')


def is_heading(line):
    """A line of its own that names what the indented lines under it are:
    'Exit codes:', 'Commands:', 'Config (default ...):'."""
    return bool(re.match(r"^[A-Z].{0,78}:$", line)) and ". " not in line


def text_blocks(text):
    """[(kind, lines)] of docstring-shaped text: "prose" runs of lines at the
    left margin and "pre" runs of indented lines (lists, tables, commands),
    kept apart where a blank line or the margin changes."""
    blocks = []
    for line in text.expandtabs().splitlines():
        if not line.strip():
            blocks.append(("blank", []))
            continue
        kind = "pre" if line.startswith(" ") else "prose"
        if blocks and blocks[-1][0] == kind:
            blocks[-1][1].append(line.rstrip())
        else:
            blocks.append((kind, [line.rstrip()]))
    return blocks


def indent_of(line):
    return len(line) - len(line.lstrip())


def split_at(line, column):
    """(tag, words) of a line whose words start at column, after a space; else None."""
    if 0 < column < len(line) and line[column - 1] == " " and line[column] != " " and line[:column].strip():
        return line[:column].strip(), line[column:]
    return None


def list_items(lines, words):
    """[(tag or None, first line, body lines)] of an indented block: an item is a
    line at the block's margin with the lines indented deeper under it. Its tag
    is what stands left of the column its deeper lines start in, or left of a
    gap of two spaces ('0    delivered', 'clone    zfs clone ...'), or a number
    ('1.'); a line with deeper lines and neither is a tag as a whole. Outside
    an item's words, a line without a tag of its own is split at the column
    where the other items' words start ('compression=lz4 cheap on CPU')."""
    margin = min(indent_of(line) for line in lines)
    items = []
    for line in lines:
        if indent_of(line) == margin or not items:
            items.append([line[margin:], []])
        else:
            items[-1][1].append(line[margin:])
    parsed, columns = [], []
    for index, (first, deeper) in enumerate(items):
        column = min(indent_of(line) for line in deeper) if deeper else 0
        body = [line[column:] for line in deeper]
        split = split_at(first, column)
        # An item's words start with the rest of its tag's line: never a tag.
        match = None if words and index == 0 else (
            re.match(r"^(\S.*?)\s{2,}(\S.*)$", first) or re.match(r"^(\d+\.)\s+(\S.*)$", first))
        if split:
            parsed.append((split[0], first, [split[1]] + body))
        elif match:
            columns.append(match.start(2))
            parsed.append((match.group(1), first, [match.group(2)] + body))
        else:
            parsed.append((first if deeper else None, first, body))
    if columns:
        column = max(set(columns), key=columns.count)
        for index, (tag, first, body) in enumerate(parsed):
            between = 0 < index < len(parsed) - 1 and parsed[index - 1][0] and parsed[index + 1][0]
            split = None if tag or (words and not between) else split_at(first, column)
            if split:
                parsed[index] = (split[0], first, [split[1]])
    return parsed


def render_items(lines, nested, words=False):
    """An indented block as roff: a list (.TP) when any line of it is tagged,
    else lines kept as typed (commands, a log line). nested: inside a list
    item (the list goes in .RS/.RE); words: the block is the item's own words,
    whose untagged lines are filled text."""
    items = list_items(lines, words)
    if not any(tag for tag, _, _ in items):
        if words:
            return [roff_text(first.strip()) for _, first, _ in items]
        margin = min(indent_of(line) for line in lines)
        return [".RS" if nested else ".RS 4", ".sp", ".nf"] + [roff_text(line[margin:]) for line in lines] + [".fi", ".RE"]
    width = min(12, max(len(tag) for tag, _, _ in items if tag) + 2)
    out, in_list, after_list = [], False, False
    for tag, first, body in items:
        if words and (tag is None or tag == first):
            # The item's own words; a line with deeper lines under it
            # ("TARGET is exactly one of:") leads into them.
            if in_list:
                out.append(".RE")
                in_list, after_list = False, True
            out += ([".IP"] if after_list else []) + [roff_text(first.strip())]
            after_list = False
            if body:
                out += render_items(body, True)
                after_list = True
            continue
        if nested and not in_list:
            out.append(".RS")
            in_list = True
        out += [".TP %d" % width, "\\fB%s\\fR" % roff_text(tag) if tag else roff_text(first)]
        out += render_items(body, True, words=True) if body else []
    if in_list:
        out.append(".RE")
    return out


def render_text(text, nested=False):
    """Docstring-shaped text as roff: prose filled, each indented block a list
    or lines as typed, a one-line heading right above an indented block a
    subsection. nested: the words of a list item (no subsections, no .PP,
    which would end the item)."""
    out = []
    blocks = [block for block in text_blocks(text) if block[0] != "blank"]
    for index, (kind, lines) in enumerate(blocks):
        following = blocks[index + 1][0] if index + 1 < len(blocks) else None
        if kind == "pre":
            out += render_items(lines, nested)
        elif not nested and len(lines) == 1 and is_heading(lines[0]) and following == "pre":
            out.append(".SS " + roff_quoted(lines[0][:-1]))
        else:
            out += ([".IP"] if index else []) if nested else [".PP"]
            out.extend(roff_text(line) for line in lines)
    return out


def page(name, section, version, body):
    """A whole page: the title line, then the body's requests."""
    title = ".TH %s %s \"\" %s %s" % (roff_quoted(name.upper()), section,
                                      roff_quoted("%s %s" % (MANUAL, version)), roff_quoted(MANUAL))
    return "\n".join([".\\\" Generated by tools/mkman.py from the scripts of pg_zfs: do not edit.",
                      title, ".nh", ".ad l"] + body) + "\n"


# ---------------------------------------------------------------------------
# The scripts: module, parser, docstring
# ---------------------------------------------------------------------------

def load_script(path):
    """The script at path as a module (its main() does not run)."""
    name = "pg_zfs_mkman_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Caught(Exception):
    def __init__(self, parser):
        Exception.__init__(self, "parser caught")
        self.parser = parser


def script_parser(module):
    """The ArgumentParser the script's parse_args builds, caught before it parses."""
    original = argparse.ArgumentParser.parse_known_args    # parse_args calls it too

    def catch(parser, args=None, namespace=None):
        raise _Caught(parser)
    argparse.ArgumentParser.parse_known_args = catch
    try:
        module.parse_args([])
    except _Caught as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise SystemExit("mkman: %s.parse_args built no parser" % module.__name__)


def one_line_usage(parser):
    """The parser's usage on one line (no terminal width involved), without 'usage: '."""
    keep = parser.formatter_class
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100000)
    try:
        usage = parser.format_usage()
    finally:
        parser.formatter_class = keep
    return " ".join(usage.split())[len("usage: "):]


def metavar(action):
    """What follows an option in its tag: argparse's own default metavar."""
    if action.metavar is not None:
        shown = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        shown = "{%s}" % ",".join(str(choice) for choice in action.choices)
    else:
        shown = action.dest.upper() if action.option_strings else action.dest
    nargs = action.nargs
    if nargs == 0:
        return ""
    if nargs == "?":
        return "[%s]" % shown
    if nargs == "*":
        return "[%s ...]" % shown
    if nargs == "+":
        return "%s [%s ...]" % (shown, shown)
    return shown


def expanded_help(action, prog):
    """The help text with argparse's %(default)s-style fields filled in."""
    params = dict(vars(action), prog=prog)
    params = dict((key, value) for key, value in params.items() if value is not argparse.SUPPRESS)
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(choice) for choice in params["choices"])
    return (action.help or "") % params


def option_entries(parser):
    """.TP entries for every visible option and positional of one parser."""
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        after = metavar(action)
        if action.option_strings:
            tag = ", ".join("\\fB%s\\fR" % roff_text(option) for option in action.option_strings)
            tag += " \\fI%s\\fR" % roff_text(after) if after else ""
        else:
            tag = "\\fI%s\\fR" % roff_text(after)
        out.extend([".TP", tag, roff_text(" ".join(expanded_help(action, parser.prog).split())) or "\\&"])
    return out


def subcommands(parser):
    """[(name, help, subparser)] of the parser's subcommands, in their order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = dict((choice.dest, choice.help) for choice in action._choices_actions)
            found, seen = [], set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:         # an alias names a parser already listed
                    seen.add(id(sub))
                    found.append((name, helps.get(name) or "", sub))
            return found
    return []


def command_page(path, module, bindir, docdir, commands):
    """NAME.py(1) of one script: named as it is typed, NAME.py."""
    command = os.path.basename(path)
    parser = script_parser(module)
    for _, _, sub in subcommands(parser):     # "pg_zfs_restore restore" -> "pg_zfs_restore.py restore"
        if sub.prog.startswith(parser.prog + " "):
            sub.prog = command + sub.prog[len(parser.prog):]
    parser.prog = command
    summary, _, rest = module.__doc__.strip("\n").partition("\n\n")
    summary = " ".join(summary.split()).rstrip(".")
    if summary[:1].isupper() and summary[1:2].islower():
        summary = summary[0].lower() + summary[1:]
    body = [".SH NAME", "%s \\- %s" % (roff_text(command), roff_text(summary)), ".SH SYNOPSIS"]
    usages = [one_line_usage(parser)] + [one_line_usage(sub) for _, _, sub in subcommands(parser)]
    for index, usage in enumerate(usages):
        body += ([".br"] if index else []) + [roff_text(usage)]
    body += [".SH DESCRIPTION"] + render_text(rest)
    body += [".SH OPTIONS"] + option_entries(parser)
    for name, summary_line, sub in subcommands(parser):
        body += [".SS " + roff_quoted("%s %s" % (command, name))]
        for text in (summary_line, sub.description, sub.epilog):
            if text and text != argparse.SUPPRESS:
                body += render_text(text)
        body += option_entries(sub)
    config = getattr(module, "DEFAULT_CONFIG", None)
    if config:
        body += [".SH FILES", ".TP", "\\fI%s\\fR" % roff_text(config),
                 "the configuration read when neither \\fB\\-c\\fR nor \\fBPG_ZFS_CONFIG\\fR names "
                 "one; see \\fBpg_zfs.conf\\fR(5)."]
    body += see_also([other for other in commands if other != command], docdir)
    return page(command, 1, module.VERSION, with_bindir(body, bindir))


def see_also(commands, docdir):
    pages = ["\\fB%s\\fR(1)" % roff_text(other) for other in commands] + ["\\fBpg_zfs.conf\\fR(5)"]
    return [".SH \"SEE ALSO\"", ",\n".join(pages) + ";",
            "\\fI%s\\fR" % roff_text(os.path.join(docdir, "README.md"))]


def with_bindir(lines, bindir):
    """The lines with the scripts' wiring path replaced by where they are installed."""
    if not bindir:
        return lines
    return [line.replace(roff_text(WIRING_BINDIR), roff_text(bindir)) for line in lines]


# ---------------------------------------------------------------------------
# The config: which script reads which key, with which default
# ---------------------------------------------------------------------------

def is_constant(module, name):
    """A module-level constant of the script (DEFAULT_PREFIX), not a local that shares a name."""
    return name.isupper() and hasattr(module, name)


def evaluate(node, env, module):
    """The value of a default or key expression: a literal, a module constant,
    a loop variable (env), a subscript or a sum of those; Unresolved otherwise."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(evaluate(item, env, module) for item in node.elts)
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if is_constant(module, node.id):
            return getattr(module, node.id)
    elif isinstance(node, ast.Subscript):
        index = node.slice.value if isinstance(node.slice, getattr(ast, "Index", ())) else node.slice
        try:
            return evaluate(node.value, env, module)[evaluate(index, env, module)]
        except (KeyError, IndexError, TypeError):
            pass
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return evaluate(node.left, env, module) + evaluate(node.right, env, module)
    raise Unresolved(ast.dump(node))


def loop_bindings(loop, module):
    """[{name: value}] for `for a, b in ((x, y), ...)` over constants; None otherwise."""
    names = [loop.target] if isinstance(loop.target, ast.Name) else getattr(loop.target, "elts", [])
    if not names or not all(isinstance(name, ast.Name) for name in names):
        return None
    try:
        bindings = []
        for item in evaluate(loop.iter, {}, module):
            values = [item] if isinstance(loop.target, ast.Name) else list(item)
            if len(values) != len(names):
                return None
            bindings.append(dict((name.id, value) for name, value in zip(names, values)))
    except (Unresolved, TypeError):
        return None
    return bindings


class ConfigReads(ast.NodeVisitor):
    """Every config.str/int/choice/list/duration(SECTION, KEY[, DEFAULT]) call of
    one script: reads[(section, key)] = default, REQUIRED or COMPUTED."""

    def __init__(self, module, schema):
        self.module = module
        self.schema = schema
        self.envs = [{}]
        self.reads = {}
        self.problems = []

    def visit_ClassDef(self, node):
        if node.name != "Config":       # Config's own methods pass section and key through
            self.generic_visit(node)

    def visit_For(self, node):
        bindings = loop_bindings(node, self.module)
        if bindings is None:
            self.generic_visit(node)
            return
        outer = self.envs
        self.envs = [dict(env, **binding) for env in outer for binding in bindings]
        for child in node.body + node.orelse:
            self.visit(child)
        self.envs = outer

    def visit_Call(self, node):
        self.generic_visit(node)
        function = node.func
        if not (isinstance(function, ast.Attribute) and function.attr in CONFIG_METHODS and len(node.args) >= 2):
            return
        section = self.section_of(node.args[0])
        if section is None:
            return
        for env in self.envs:
            for key, key_env in self.keys_of(node.args[1], section, env):
                self.note(section, key, self.default_of(node, function.attr, key_env), node)

    def section_of(self, node):
        """The schema section a call reads: a constant, or for a variable the NAMEd
        section it is named after ("replica_section": [replica NAME]), else "source"
        (every [source NAME] is read through one); None if not a config call."""
        if isinstance(node, ast.Name) and not is_constant(self.module, node.id):
            return next((kind for kind in NAMED_SECTIONS if kind in node.id), "source")
        try:
            section = evaluate(node, {}, self.module)
        except Unresolved:
            return None
        return section if isinstance(section, str) and section in self.schema else None

    def keys_of(self, node, section, env):
        """[(key, env)] of a key expression; "keep_" + rule stands for every key
        of the section with that prefix (rule bound to the rest)."""
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and isinstance(node.right, ast.Name)
                and node.right.id not in env):
            try:
                prefix = evaluate(node.left, env, self.module)
            except Unresolved:
                prefix = None
            if isinstance(prefix, str):
                return [(key, dict(env, **{node.right.id: key[len(prefix):]}))
                        for key in self.schema[section] if key.startswith(prefix)]
        try:
            return [(evaluate(node, env, self.module), env)]
        except Unresolved:
            self.problems.append("line %d: the key of a [%s] read cannot be placed" % (node.lineno, section))
            return []

    def default_of(self, call, method, env):
        index = DEFAULT_INDEX.get(method, 2)
        node = call.args[index] if len(call.args) > index else None
        for keyword in call.keywords:
            if keyword.arg == "default":
                node = keyword.value
        if node is None:
            return REQUIRED
        try:
            if isinstance(node, ast.IfExp):
                return OneOf((evaluate(node.body, env, self.module), evaluate(node.orelse, env, self.module)))
            return evaluate(node, env, self.module)
        except Unresolved:
            return COMPUTED

    def note(self, section, key, default, node):
        if key not in self.schema[section]:
            self.problems.append("line %d: [%s] %s is not in CONFIG_SCHEMA" % (node.lineno, section, key))
            return
        # A key read twice with different defaults: a default wins over "required".
        if (section, key) not in self.reads or self.reads[(section, key)] is REQUIRED:
            self.reads[(section, key)] = default


def config_reads(path, module):
    """({(section, key): default} of one script, [problems])."""
    with open(path, "rb") as source:
        tree = ast.parse(source.read(), path)
    visitor = ConfigReads(module, module.CONFIG_SCHEMA)
    visitor.visit(tree)
    # pg_wal_fetch.py keeps most of its code in the texts QUICK and REST, compiled
    # when a call needs them: its config reads are in there.
    for node in tree.body:
        text = getattr(node.value, "s", getattr(node.value, "value", None)) if isinstance(node, ast.Assign) else None
        names = [getattr(target, "id", None) for target in getattr(node, "targets", [])]
        if names in (["QUICK"], ["REST"]) and isinstance(text, str):    # ast.Str up to 3.7, ast.Constant from 3.8
            visitor.visit(ast.parse(text, "%s:%s" % (path, names[0])))
    return visitor.reads, visitor.problems


def schema_comment(path):
    """The comment lines right above `CONFIG_SCHEMA = {` in a script, as text."""
    lines = open(path, encoding="utf-8").read().splitlines()
    end = lines.index("CONFIG_SCHEMA = {")
    start = end
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    return " ".join(line.lstrip("#").strip() for line in lines[start:end])


def example_sections(path):
    """(intro, [(section, [(key, value, comment)])]) of the example config: the
    comment at the top, and each key with the comment lines above it."""
    intro, sections, comment = [], [], []
    for raw in open(path, encoding="utf-8").read().splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            comment.append(line[2:] if line.startswith("# ") else line[1:])
        elif line.startswith("["):
            if not sections:
                intro, comment = intro + comment, []
            sections.append((line.strip("[]"), []))
        elif "=" in line and sections:
            key, _, value = line.partition("=")
            sections[-1][1].append((key.strip(), value.strip(), "\n".join(comment)))
            comment = []
        elif not line and not sections:
            intro, comment = intro + comment + [""], []
    return "\n".join(intro).strip("\n"), sections


def kind_words(kind):
    if isinstance(kind, tuple):
        return "one of " + ", ".join(kind)
    return {"int": "a whole number", "duration": "a duration", "text": "text"}.get(kind, kind)


def shown_value(value, kind):
    if value is REQUIRED:
        return "none (required)"
    if value is COMPUTED:
        return "computed from other keys"
    if isinstance(value, OneOf):
        return "%s (by other keys)" % " or ".join(shown_value(one, kind) for one in value)
    if kind == "duration" and isinstance(value, int) and value:
        for unit, seconds in DURATION_STEPS:
            if value % seconds == 0:
                return "%d%s" % (value // seconds, unit)
    text = str(value)
    return text if text else "empty"


def default_sentence(defaults, kind):
    """'Default: X.' or, where the scripts differ, each default with its scripts."""
    by_value = {}
    for script in sorted(defaults):
        by_value.setdefault(shown_value(defaults[script], kind), []).append(script)
    if len(by_value) == 1:
        return "Default: %s." % list(by_value)[0]
    return "Default: %s." % "; ".join("%s (%s)" % (value, ", ".join(scripts))
                                      for value, scripts in sorted(by_value.items()))


def config_page(scripts, example, docdir, bindir):
    """pg_zfs.conf(5): every key of CONFIG_SCHEMA, in the example config's order."""
    first = scripts[0][1]
    schema = first.CONFIG_SCHEMA
    reads = {}          # (section, key) -> {script: default}
    checks = {}         # section -> [scripts]
    for path, module in scripts:
        prog = os.path.basename(path)
        found, _ = config_reads(path, module)
        for place, default in found.items():
            reads.setdefault(place, {})[prog] = default
        for section in module.CONFIG_READS:
            checks.setdefault(section, []).append(prog)
    intro, sections = example_sections(example)
    described = {}
    order = []
    for section, keys in sections:
        kind = first.schema_section(section)
        if kind is None or kind in described:
            continue
        described[kind] = dict((key, (value, comment)) for key, value, comment in keys)
        order.append(kind)
    order += [section for section in schema if section not in described]
    body = [".SH NAME", "pg_zfs.conf \\- configuration of the pg_zfs scripts", ".SH SYNOPSIS",
            "\\fI%s\\fR" % roff_text(first.DEFAULT_CONFIG), ".SH DESCRIPTION"]
    body += render_text(intro)
    body += render_text(schema_comment(scripts[0][0]))
    body += [".PP", "Values:", ".TP", "\\fIa duration\\fR", roff_text(first.Config.duration.__doc__.strip())]
    for section in order:
        title = section + " NAME" if section in NAMED_SECTIONS else section
        body += [".SH " + roff_quoted("[%s]" % title)]
        body += render_text("Checked (an unknown key is refused) by: %s."
                            % ", ".join(sorted(checks.get(section, ["none of the scripts"]))))
        keys = list(described.get(section, {})) + [key for key in schema[section]
                                                    if key not in described.get(section, {})]
        for key in keys:
            if key not in schema[section]:
                continue
            kind = schema[section][key]
            value, comment = described.get(section, {}).get(key, ("", ""))
            defaults = reads.get((section, key), {})
            body += [".TP", "\\fB%s\\fR = \\fI%s\\fR" % (roff_text(key), roff_text(kind_words(kind)))]
            words = render_text(comment, nested=True)
            body += words
            facts = []
            if defaults:
                facts.append(default_sentence(defaults, kind))
            if value and all(shown_value(default, kind) != value for default in defaults.values()):
                facts.append("Example: %s." % value)
            facts.append("Read by: %s." % (", ".join(sorted(defaults)) or "no script directly"))
            body += ([".IP"] if words else []) + [roff_text(" ".join(facts))]
    body += [".SH FILES", ".TP", "\\fI%s\\fR" % roff_text(first.DEFAULT_CONFIG),
             "the file every script reads unless \\fB\\-c\\fR or \\fBPG_ZFS_CONFIG\\fR names another.",
             ".TP", "\\fI%s\\fR" % roff_text(os.path.join(docdir, "examples", "pg_zfs.conf.example")),
             "the example this page is made from.",
             ] + see_also([os.path.basename(path) for path, _ in scripts], docdir)
    return page("pg_zfs.conf", 5, first.VERSION, with_bindir(body, bindir))


# ---------------------------------------------------------------------------

def build(bin_dir, example, out_dir, bindir, docdir):
    """Write every page into out_dir; return the warnings (config reads not placed)."""
    scripts = [(os.path.join(bin_dir, name + ".py"), None) for name in SCRIPTS]
    scripts = [(path, load_script(path)) for path, _ in scripts]
    versions = set(module.VERSION for _, module in scripts)
    if len(versions) != 1:
        raise SystemExit("mkman: the scripts disagree on VERSION: %s" % ", ".join(sorted(versions)))
    warnings = []
    for path, module in scripts:
        warnings += ["%s: %s" % (path, problem) for problem in config_reads(path, module)[1]]
    progs = [os.path.basename(path) for path, _ in scripts]
    pages = dict(("%s.1" % os.path.basename(path), command_page(path, module, bindir, docdir, progs))
                 for path, module in scripts)
    pages["pg_zfs.conf.5"] = config_page(scripts, example, docdir, bindir)
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    for name, text in sorted(pages.items()):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as out:
            out.write(text)
    return warnings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", metavar="OUTDIR")
    parser.add_argument("--bin", default=os.path.join(REPO, "bin"), help="the scripts (default: bin/)")
    parser.add_argument("--example", default=os.path.join(REPO, "etc", "pg_zfs.conf.example"))
    parser.add_argument("--bindir", default="", help="where the scripts are installed (default: as they say)")
    parser.add_argument("--docdir", default="/usr/share/doc/pg_zfs", help="where README.md is installed")
    args = parser.parse_args(argv)
    warnings = build(args.bin, args.example, args.out_dir, args.bindir, args.docdir)
    for warning in warnings:
        sys.stderr.write("mkman: warning: %s\n" % warning)
    return 0


if __name__ == "__main__":
    sys.exit(main())
