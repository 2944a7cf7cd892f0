"""The validate step: Great Expectations suites on silver, the quality gate and its reports."""
