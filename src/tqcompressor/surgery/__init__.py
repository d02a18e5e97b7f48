"""Model surgery: applying a plan by swapping modules in place, and the exact rewrites around it."""
