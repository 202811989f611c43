//! udm-tests: shared helpers for end-to-end tests (see tests/ for the tests).
