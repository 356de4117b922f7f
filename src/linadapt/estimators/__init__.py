"""The scikit-learn style estimators (regression, classification) and their ``.linadapt`` files."""
