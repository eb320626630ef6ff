"""The typing rule of every layer that handles tensors (helpers/core, tasks, models, techniques, studies), kept: a
public function (module level, or a public class's method, `__init__` and `__call__` included) that takes or returns
a tensor gives its shape with jaxtyping (`Float[Tensor, "batch pos d_model"]`, never a bare `Tensor`), and its
`model` parameter is annotated `Model` (`helpers.core.components.Model`). In helpers/models a `model` may instead be
annotated `PreTrainedModel`: the Hugging Face model a recipe builds, trains and saves before any bridge wraps it.
The annotations are strings (`from __future__ import annotations`), so each jaxtyping type is also built here once,
which parses its dimensions."""
import ast
import importlib

import jaxtyping
import pytest
import torch

from helpers.core.paths import PACKAGE_DIR

LAYERS = ("core", "tasks", "models", "techniques", "studies")
MODEL_TYPES = {"models": ("Model", "PreTrainedModel")}
"""The annotations a `model` parameter may name, by layer (elsewhere `Model` only)."""
PENDING: dict[str, str] = {}
"""Modules known to break the rule, with the reason; each test of them is an expected failure until it passes."""
DTYPES = {name: value for name, value in vars(jaxtyping).items() if isinstance(value, type)
          and issubclass(value, jaxtyping.AbstractDtype) and value is not jaxtyping.AbstractDtype}
BASE_NAMESPACE = {**DTYPES, "Tensor": torch.Tensor, "torch": torch}  # for names imported only for type checkers


def public_functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_")
                                                          or item.name in ("__init__", "__call__")):
                    yield f"{node.name}.{item.name}", item


def annotation_problems(annotation: ast.expr, namespace: dict) -> list[str]:
    """Bare tensors in `annotation`, and jaxtyping types in it that do not build."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # a quoted annotation
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return []
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name) \
            and annotation.value.id in DTYPES:
        try:
            eval(compile(ast.Expression(annotation), "<annotation>", "eval"), {**BASE_NAMESPACE, **namespace})
        except Exception as error:  # noqa: BLE001 - whatever jaxtyping raises
            return [f"{ast.unparse(annotation)} does not build: {error}"]
        return []
    if isinstance(annotation, ast.Name) and annotation.id == "Tensor" or \
            isinstance(annotation, ast.Attribute) and annotation.attr == "Tensor":
        return ["a bare Tensor"]
    return [problem for child in ast.iter_child_nodes(annotation) for problem in annotation_problems(child, namespace)]


def problems(source: str, namespace: dict, model_types: tuple[str, ...] = ("Model",)) -> list[str]:
    """What breaks the rule in `source`, one line per problem: `function(parameter): what`; a `model` parameter
    must name one of `model_types`."""
    found = []
    for name, node in public_functions(ast.parse(source)):
        arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        annotated = [(arg.arg, arg.annotation) for arg in arguments] + [("return", node.returns)]
        for parameter, annotation in annotated:
            if parameter == "model" and not (annotation is not None and any(
                    isinstance(n, ast.Name) and n.id in model_types for n in ast.walk(annotation))):
                found.append(f"{name}(model): not annotated {' or '.join(model_types)}")
            if annotation is not None:
                found += [f"{name}({parameter}): {problem}" for problem in annotation_problems(annotation, namespace)]
    return found


def relative(path) -> str:
    return path.relative_to(PACKAGE_DIR).as_posix()


MODULES = sorted(path for layer in LAYERS for path in (PACKAGE_DIR / layer).rglob("*.py")
                 if path.name != "__init__.py")


@pytest.mark.parametrize("path", [pytest.param(path, marks=pytest.mark.xfail(reason=PENDING[relative(path)]))
                                  if relative(path) in PENDING else path for path in MODULES], ids=relative)
def test_public_functions_type_tensors_with_jaxtyping_and_the_model_as_Model(path):
    module = importlib.import_module("helpers." + relative(path).removesuffix(".py").replace("/", "."))
    layer = relative(path).split("/")[0]
    assert problems(path.read_text(), vars(module), MODEL_TYPES.get(layer, ("Model",))) == []


def test_the_rule_sees_a_planted_bare_tensor_an_untyped_model_and_a_broken_shape():
    source = '''
def fine(model: Model, tokens: Int[Tensor, "batch pos"]) -> dict[str, Float[Tensor, "batch ..."]]: ...
def _private(model, x: Tensor) -> Tensor: ...
def bare(model: Model, tokens: Tensor | None) -> "Tensor": ...
def untyped(model, layer: int) -> int: ...
def broken(x: Float[Tensor, "*a *b"]) -> Float[Tensor, " n"]: ...
class Kept:
    def __init__(self, model, x: torch.Tensor): ...
    def __call__(self, x: Float[Tensor, "n"]) -> Float[Tensor, ""]: ...
'''
    assert problems(source, {"Model": "TransformerBridge"}) == [
        "bare(tokens): a bare Tensor", "bare(return): a bare Tensor", "untyped(model): not annotated Model",
        "broken(x): Float[Tensor, '*a *b'] does not build: Cannot use variadic specifiers (`*name` or `...`) more "
        "than once.", "Kept.__init__(model): not annotated Model", "Kept.__init__(x): a bare Tensor"]


def test_a_hugging_face_model_is_allowed_in_the_models_layer_only():
    source = "def lm_loss(model: PreTrainedModel, batch: tuple[Int[Tensor, 'b pos']]) -> Float[Tensor, '']: ..."
    assert problems(source, {}, MODEL_TYPES["models"]) == []
    assert problems(source, {}) == ["lm_loss(model): not annotated Model"]
