"""Pure request routing: which route a request takes (`match`) and which backend of a weighted
split serves it (`split`)."""
