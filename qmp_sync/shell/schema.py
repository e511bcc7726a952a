"""
What the server says it understands, read for the shell: command names
(``query-commands``), their arguments with types (``query-qmp-schema``),
and the human monitor's commands (its ``help`` text).

Pure: built from the server's answers, which the caller fetches; no I/O.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence

__all__ = ("Argument", "HumanCommands", "Schema", "mappings", "suggest")

# QAPI's ``'gen': false`` commands take arguments the schema does not
# list (device properties), so their argument names are not checked.
_OPEN_ARGUMENTS = frozenset({"device_add"})
# Enum values shown by `Schema.describe` before "...".
_ENUM_PREVIEW = 6


def suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """" (did you mean 'x'?)" for the choices closest to `word`, each
    shown after `prefix`, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.8)
    if not close:
        return ""
    shown = " or ".join(repr(prefix + c) for c in close)
    return f" (did you mean {shown}?)"


@dataclasses.dataclass(frozen=True)
class Argument:
    """One argument (object member) of a command, as `help` shows it."""

    name: str
    #: The type in words: ``str``, ``[int]``, ``enum (a, b)``, ...
    type: str
    optional: bool
    #: The features that matter to a user: deprecated, unstable.
    notes: tuple[str, ...] = ()


class Schema:
    """
    The commands a QMP server accepts, and (when it supports
    ``query-qmp-schema``) their arguments.

    :param commands: Command names, from ``query-commands``.
    :param entities: The ``query-qmp-schema`` answer, or None when the
        server has no introspection (qemu-ga): then arguments are not
        known, and never refused.
    """

    def __init__(self, commands: Iterable[str],
                 entities: Sequence[Mapping[str, object]] | None = None
                 ) -> None:
        self.commands = sorted(set(commands))
        self._entities = {str(e.get("name")): e for e in entities or ()}

    @classmethod
    def unknown(cls) -> Schema:
        """A schema for a server that told us nothing: no command is
        refused, nothing is completed."""
        return cls(())

    @property
    def known(self) -> bool:
        """Whether the server listed its commands."""
        return bool(self.commands)

    # ------------------------------------------------------------------
    # Checking a command before it is sent.

    def check(self, name: str, arguments: Mapping[str, object]) -> str | None:
        """
        Why the server would refuse command `name` with `arguments`
        because of a misspelt name, or None when it looks right (or when
        the schema cannot tell). Argument names are checked at every
        level of nesting (``file.driver``) where the value is an object
        of a known type, and so are the actions of a ``transaction``;
        inside a union, a member of any of its variants is accepted.
        """
        if not self.known:
            return None
        if name not in self.commands:
            hint = suggest(name, self.commands) or "; 'help' lists them"
            return f"unknown command {name!r}{hint}"
        try:
            problem = self._check_members(
                name, self._command_arg_type(name), arguments)
        except RecursionError:
            return (f"the arguments of {name!r} are nested too deeply "
                    "to send")
        if problem is None and name == "transaction":
            actions = arguments.get("actions")
            for action in actions if isinstance(actions, list) else ():
                if isinstance(action, Mapping):
                    problem = self._check_action(action)
                    if problem:
                        break
        return problem

    def _check_action(self, action: Mapping[str, object]) -> str | None:
        """The `check` of one transaction action."""
        kind = action.get("type")
        types = self.action_types()
        if not isinstance(kind, str) or not types:
            return None
        if kind not in types:
            hint = suggest(kind, types)
            return f"unknown transaction action {kind!r}{hint}"
        data = action.get("data")
        return self._check_members(
            f"action {kind}", self._action_data_type(kind),
            data if isinstance(data, Mapping) else {})

    def _check_members(self, what: str, type_name: str | None,
                       given: Mapping[str, object],
                       prefix: str = "") -> str | None:
        """The first name in `given` (nested objects included, named
        with `prefix`) that object type `type_name` does not have, with
        a suggestion; None if all are known."""
        if type_name is None or what in _OPEN_ARGUMENTS:
            return None
        members = {str(m.get("name")): str(m.get("type"))
                   for m in self._raw_members(type_name, None)}
        for key, value in given.items():
            if key not in members:
                if not members and not prefix:
                    return f"{what} takes no arguments, not {key!r}"
                hint = suggest(key, members, prefix) or (
                    f"; 'help {what}' lists them"
                    if not what.startswith("action ") and not prefix
                    else "")
                return f"{what} has no argument {prefix + key!r}{hint}"
            if isinstance(value, Mapping):
                problem = self._check_members(
                    what, self._object_branch(members[key]), value,
                    f"{prefix}{key}.")
                if problem:
                    return problem
        return None

    # ------------------------------------------------------------------
    # Arguments, for help and completion.

    def arguments(self, name: str,
                  given: Mapping[str, object] | None = None,
                  path: Sequence[str] = ()) -> list[Argument]:
        """
        The arguments of command `name` (or, after ``transaction(``, of
        the action `name` when it is not a command), or of the nested
        object at dotted `path` among them.

        :param given: The arguments typed so far: a union's tag value
            there (``driver=qcow2``) adds that variant's members;
            without it only the common members are listed.
        """
        type_name, given = self._object_at(name, given or {}, path)
        if type_name is None:
            return []
        return self._members(type_name, given)

    def values(self, name: str, argument: str,
               given: Mapping[str, object] | None = None,
               path: Sequence[str] = ()) -> list[str]:
        """The words an argument (of the nested object at dotted `path`)
        can take: enum values, true/false; [] when it is free text."""
        type_name, given = self._object_at(name, given or {}, path)
        for arg in self._raw_members(type_name or "", given):
            if arg.get("name") == argument:
                return self._words(str(arg.get("type")))
        return []

    def _object_at(self, name: str, given: Mapping[str, object],
                   path: Sequence[str]
                   ) -> tuple[str | None, Mapping[str, object]]:
        """The object type at dotted `path` in the arguments of command
        (or transaction action) `name`, and the part of `given` there."""
        type_name = (self._command_arg_type(name)
                     or self._action_data_type(name))
        for part in path:
            if type_name is None:
                break
            type_name = self._member_object(type_name, part, given)
            nested = given.get(part)
            given = nested if isinstance(nested, Mapping) else {}
        return type_name, given

    def describe(self, name: str) -> list[str]:
        """
        Lines of ``help NAME``: each argument with its type and whether
        it is optional; for a union, what each tag value adds.
        """
        type_name = self._command_arg_type(name)
        if type_name is None:
            return []
        entity = self._entities.get(type_name, {})
        members = self._members(type_name, {})
        if not members:
            return ["  (no arguments)"]
        width = max(len(m.name) for m in members)
        lines = [
            f"  {m.name:<{width}}  "
            f"{'optional' if m.optional else 'required'}  {m.type}"
            + "".join(f" ({note})" for note in m.notes)
            for m in members]
        tag = entity.get("tag")
        for case, variant in self._variants(entity):
            extra = [m.name for m in self._members(variant, None)]
            if extra:
                lines.append(f"  with {tag}={case}: {', '.join(extra)}")
        return lines

    def action_types(self) -> list[str]:
        """The action types a ``transaction`` takes."""
        union = self._action_union()
        return [case for case, _ in self._variants(union)]

    # ------------------------------------------------------------------
    # Reading the introspection data.

    def _command_arg_type(self, name: str) -> str | None:
        entity = self._entities.get(name)
        if entity is None or entity.get("meta-type") != "command":
            return None
        arg_type = entity.get("arg-type")
        return arg_type if isinstance(arg_type, str) else None

    def _action_union(self) -> Mapping[str, object]:
        """The union type of transaction actions, or {}."""
        arg_type = self._command_arg_type("transaction")
        actions = self._member_type(arg_type, "actions") if arg_type else None
        array = self._entities.get(actions or "", {})
        element = array.get("element-type")
        return self._entities.get(str(element), {})

    def _action_data_type(self, kind: str) -> str | None:
        """The type of the ``data`` of transaction action `kind`."""
        for case, wrapper in self._variants(self._action_union()):
            if case == kind:
                return self._member_type(wrapper, "data")
        return None

    def _member_type(self, type_name: str, member: str) -> str | None:
        for arg in self._raw_members(type_name, None):
            if arg.get("name") == member:
                return str(arg.get("type"))
        return None

    def _member_object(self, type_name: str, member: str,
                       given: Mapping[str, object]) -> str | None:
        """The object type of `member` of `type_name` (the object branch
        of an alternate), or None."""
        for arg in self._raw_members(type_name, given):
            if arg.get("name") == member:
                return self._object_branch(str(arg.get("type")))
        return None

    def _object_branch(self, type_name: str) -> str | None:
        entity = self._entities.get(type_name, {})
        if entity.get("meta-type") == "object":
            return type_name
        if entity.get("meta-type") == "alternate":
            for branch in mappings(entity.get("members")):
                found = self._object_branch(str(branch.get("type")))
                if found:
                    return found
        return None

    @staticmethod
    def _variants(entity: Mapping[str, object]) -> list[tuple[str, str]]:
        return [(str(v.get("case")), str(v.get("type")))
                for v in mappings(entity.get("variants"))]

    def _raw_members(self, type_name: str,
                     given: Mapping[str, object] | None
                     ) -> list[Mapping[str, object]]:
        """
        The member entries of object type `type_name`, union variants
        included: every variant when `given` is None, else the one its
        tag selects.
        """
        entity = self._entities.get(type_name, {})
        members = list(mappings(entity.get("members")))
        tag = entity.get("tag")
        for case, variant in self._variants(entity):
            if given is None or (isinstance(tag, str)
                                 and given.get(tag) == case):
                members += self._raw_members(variant, given)
        return members

    def _members(self, type_name: str,
                 given: Mapping[str, object] | None) -> list[Argument]:
        found: dict[str, Argument] = {}
        for arg in self._raw_members(type_name, given):
            name = str(arg.get("name"))
            features = arg.get("features")
            notes = tuple(f for f in features if f in (
                "deprecated", "unstable")) if isinstance(
                    features, list) else ()
            found.setdefault(name, Argument(
                name, self._type_words(str(arg.get("type"))),
                "default" in arg, notes))
        return list(found.values())

    def _type_words(self, type_name: str, depth: int = 0) -> str:
        """A type as `help` shows it."""
        entity = self._entities.get(type_name)
        if entity is None or depth > 3:
            return type_name
        meta = entity.get("meta-type")
        if meta == "enum":
            values = self._words(type_name)
            shown = ", ".join(values[:_ENUM_PREVIEW])
            more = ", ..." if len(values) > _ENUM_PREVIEW else ""
            return f"enum ({shown}{more})"
        if meta == "array":
            element = str(entity.get("element-type"))
            return f"[{self._type_words(element, depth + 1)}]"
        if meta == "alternate":
            return " or ".join(
                self._type_words(str(b.get("type")), depth + 1)
                for b in mappings(entity.get("members")))
        if meta == "builtin":
            return type_name
        return "object"

    def _words(self, type_name: str) -> list[str]:
        entity = self._entities.get(type_name, {})
        meta = entity.get("meta-type")
        if meta == "builtin" and entity.get("json-type") == "boolean":
            return ["true", "false"]
        if meta != "enum":
            return []
        members = list(mappings(entity.get("members")))
        if members:
            return [str(m.get("name")) for m in members]
        # QEMU before 6.2 lists enum values only under "values".
        values = entity.get("values")
        return [str(v) for v in values] if isinstance(values, list) else []


def mappings(value: object) -> Iterable[Mapping[str, object]]:
    """The mappings in `value` when it is a list (the server's answers:
    trust nothing about their shape)."""
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, Mapping))


class HumanCommands:
    """
    The human monitor's command names and ``info`` topics, read from
    the text of its ``help`` and ``info`` commands.
    """

    def __init__(self, help_text: str = "", info_text: str = "") -> None:
        self.commands = sorted(
            {name for line in help_text.splitlines()
             if line[:1].isalpha()
             for name in line.split()[0].split("|")})
        self.info_topics = sorted(
            line.split()[1] for line in info_text.splitlines()
            if line.startswith("info ") and len(line.split()) > 1)
