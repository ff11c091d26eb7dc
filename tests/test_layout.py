"""The house rules that a reading of the source can check: the command line sits on top of the library."""

import import_graph


def test_nothing_in_the_library_or_eval_imports_the_command_line():
    edges = import_graph.graph()
    assert "spikelm.training" in edges and "eval/distillation_table.py" in edges  # the graph reads both trees
    assert import_graph.cli_imports(edges) == []


def test_the_check_sees_an_import_of_the_command_line():
    edges = {"spikelm.training": {"spikelm.cli.train"}, "eval/x.py": {"spikelm.cli"},
             "spikelm.cli.train": {"spikelm.training"}}
    assert import_graph.cli_imports(edges) == ["spikelm.training -> spikelm.cli.train", "eval/x.py -> spikelm.cli"]


def test_the_commands_import_only_what_they_run():
    """A subcommand's module imports what it runs inside run(): no module-level import of torch,
    transformers, datasets or the server's stack, so that `spikelm serve` never loads the training stack."""
    import ast

    for path in sorted((import_graph.REPO / "spikelm" / "cli").glob("*.py")):
        top = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = {alias.name for node in top for alias in node.names} | \
                {node.module for node in top if isinstance(node, ast.ImportFrom) and node.module}
        assert not names & {"torch", "transformers", "datasets", "uvicorn", "fastapi"}, path.name
