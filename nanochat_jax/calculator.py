"""
The python tool's calculator: the engine decodes the tokens between <|python_start|> and <|python_end|>,
calls calculate(), and forces "<|output_start|>result<|output_end|>" into the stream when it gets a string.
nanochat runs `eval` under a character allow-list and a 3 s SIGALRM; we never eval. The expression is parsed
with `ast` and walked against an explicit allow-list: int/float arithmetic (+ - * / // % **, unary +/-,
parentheses) plus exactly one string form, 'word'.count('letter'), which SpellingBee teaches.
Every literal and intermediate result is bounded, so no timeout is needed (see calculate).
"""

import ast
import math
import operator
import warnings

MAX_EXPR_LEN = 200  # characters; tool calls are one short line, and this also caps parser work
MAX_NODES = 100  # ast nodes (operators included), i.e. ~30 binary ops; bounds total work
MAX_DEPTH = 50  # ast nesting; bounds our recursion far below Python's ~1000 limit
MAX_MAGNITUDE = 1e15  # every literal and intermediate; ints stay small and floats keep integer precision
MAX_POW_EXP = 100  # |exponent| allowed for **
MAX_STR_LEN = 1000  # string literals; MAX_EXPR_LEN already implies it, kept in case that cap is raised


class _Reject(Exception):
    """Anything outside the allow-list or the bounds; calculate() turns it into None."""


def _number(value):
    # exact type check: bool is an int subclass (True/False), complex and bytes are out
    if type(value) not in (int, float) or not abs(value) <= MAX_MAGNITUDE:  # `not <=` also catches nan
        raise _Reject
    return value


def _pow(base, exp):
    """base ** exp, refused before computing if the result would leave the bound (so 9**9**9 never runs)."""
    if type(exp) is not int or abs(exp) > MAX_POW_EXP:
        raise _Reject
    if base == 0:
        if exp < 0:
            raise _Reject  # would be ZeroDivisionError
        return base ** exp
    # log10 |result| estimate with one decade of slack for rounding; _number does the exact check afterwards
    if exp * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE) + 1:
        raise _Reject
    return base ** exp


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow,  # operands <= 1e15, so * is cheap
}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _str_literal(node):
    return isinstance(node, ast.Constant) and type(node.value) is str and len(node.value) <= MAX_STR_LEN


def _is_count_call(node):
    """Exactly '<str literal>'.count('<str literal>'): one positional literal argument, no keywords."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and _str_literal(node.func.value) and len(node.args) == 1 and not node.keywords
            and _str_literal(node.args[0]))


def _check_shape(tree):
    """Iterative walk (no recursion) so a deep or huge tree is refused before _eval recurses into it."""
    stack, count = [(tree, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise _Reject
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _eval(node):
    if isinstance(node, ast.Constant):
        return _number(node.value)  # a bare string literal is not a result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _number(_UNARYOPS[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _number(_BINOPS[type(node.op)](_eval(node.left), _eval(node.right)))
    if _is_count_call(node):
        return _number(node.func.value.value.count(node.args[0].value))
    raise _Reject  # names, attributes, other calls, subscripts, comparisons, lambdas, f-strings, ...


def calculate(expression):
    """
    Evaluate one tool-call expression: "3*4" -> "12", "10/4" -> "2.5", "'strawberry'.count('r')" -> "3".
    Returns None for anything refused or failing, and never raises: it runs inside the decode loop.
    """
    # No thread/signal timeout: input is <= 200 chars, the tree <= 100 nodes, every number <= 1e15 (** is
    # refused before computing), and str.count runs on <= 1000-char literals, so each call is microseconds.
    try:
        if not isinstance(expression, str) or len(expression) > MAX_EXPR_LEN:
            return None
        expr = expression.strip()
        if expr.endswith("="):
            expr = expr[:-1].rstrip()  # "3*4 =" as the model may write it
        if "'" not in expr and '"' not in expr:
            expr = expr.replace(",", "")  # GSM8K thousands separators, "1,000*3" (as nanochat); never in literals
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escapes like '\d' warn at parse time
            tree = ast.parse(expr, mode="eval")
        _check_shape(tree)
        return str(_eval(tree.body))  # ints print as ints, floats as repr ("2.5", "2.0")
    except Exception:  # _Reject, SyntaxError, ValueError (null bytes), ZeroDivisionError, parser Recursion/MemoryError
        return None
