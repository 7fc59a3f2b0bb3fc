"""The case catalogue as pytest tests: ``pytest --pyargs conformance --lmconform-engine E``.

Collected only when ``--lmconform-engine`` is given (see ``pytest_plugin.py``); one test
per engine, model and case, with the CLI's verdicts.
"""

from conformance.pytest_plugin import judge


def test_case(conformance_result):
    judge(conformance_result)
