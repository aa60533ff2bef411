"""Griffe extension for the API reference: documents `__init__` docstrings that are
attached at run time.

Public classes here are `equinox.Module`s: their `__init__` is generated (as for a
dataclass), and its documentation is attached afterwards, as in diffrax, with
`Class.__init__.__doc__ = "**Arguments:** ..."`. Static analysis sees neither, so this
extension imports the package once, and for every class whose run-time `__init__`
carries such a docstring adds an `__init__` member with that docstring and the run-time
signature (so that mkdocstrings' `merge_init_into_class` shows both with the class).
"""

import importlib
import inspect

import griffe


def _annotation(annotation) -> str | None:
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def _default(value) -> str:
    """`repr`, except functions, shown by their public name (`optimistix.max_norm`)."""
    if callable(value) and hasattr(value, "__name__") and hasattr(value, "__module__"):
        return f"{value.__module__.split('.')[0]}.{value.__name__}"
    return repr(value)


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


class RuntimeInitDocstrings(griffe.Extension):
    def __init__(self, packages: list[str] | None = None) -> None:
        self.packages = packages or ["diffrax_deer"]

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name not in self.packages:
            return
        try:
            module = importlib.import_module(pkg.name)
        except ImportError as e:
            raise ImportError(
                f"The API reference imports `{pkg.name}` to read the `__init__` "
                "docstrings attached at run time; install it first, e.g. "
                "`pip install -e \".[docs]\"`."
            ) from e
        for name, member in list(pkg.members.items()):
            if name.startswith("_"):
                continue
            try:
                target = member.final_target if member.is_alias else member
            except griffe.AliasResolutionError:
                continue
            if not target.is_class or "__init__" in target.members:
                continue
            runtime = getattr(module, name, None)
            init = getattr(runtime, "__init__", None)
            doc = getattr(init, "__doc__", None)
            if not inspect.isclass(runtime) or not doc or "**Arguments:**" not in doc:
                continue
            parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
            for param in list(inspect.signature(init).parameters.values())[1:]:
                # The field's annotation as written in the source, else the run-time one.
                field = target.members.get(param.name)
                annotation = getattr(field, "annotation", None) or _annotation(
                    param.annotation
                )
                default = (
                    None
                    if param.default is inspect.Parameter.empty
                    else _default(param.default)
                )
                parameters.append(
                    griffe.Parameter(
                        param.name,
                        annotation=annotation,
                        kind=_KINDS[param.kind],
                        default=default,
                    )
                )
            function = griffe.Function(
                "__init__",
                parameters=griffe.Parameters(*parameters),
                docstring=griffe.Docstring(inspect.cleandoc(doc), parent=None),
                parent=target,
            )
            function.docstring.parent = function
            target.set_member("__init__", function)
