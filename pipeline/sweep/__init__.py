"""`imbcil sweep`: the sweep file (spec), the trial (trial), the search (search), the results (results), the driver (driver)."""
