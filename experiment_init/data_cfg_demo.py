"""Patient splits for the synthetic demo dataset (patients 001..032 of scripts/make_demo_data.py).

Laid out like the real datasets: few labeled volumes per combination, two validation volumes,
ten test volumes, and an unlabeled pool that overlaps the labeled lists (as in the original).
"""

labeled = {
    "tr1_c1": ["001"],
    "tr1_c2": ["002"],
    "tr1_c3": ["003"],
    "tr2_c1": ["001", "002"],
    "tr2_c2": ["003", "004"],
    "tr2_c3": ["005", "006"],
    "tr8_c1": ["001", "002", "003", "004", "005", "006", "007", "008"],
    "tr20": [
        "001",
        "002",
        "003",
        "004",
        "005",
        "006",
        "007",
        "008",
        "021",
        "022",
        "023",
        "024",
        "025",
        "026",
        "027",
        "028",
        "029",
        "030",
        "031",
        "032",
    ],
}

validation = {
    "tr1_c1": ["009", "010"],
    "tr1_c2": ["009", "010"],
    "tr1_c3": ["009", "010"],
    "tr2_c1": ["009", "010"],
    "tr2_c2": ["009", "010"],
    "tr2_c3": ["009", "010"],
    "tr8_c1": ["009", "010"],
    "tr20": ["009", "010"],
}

test = ["011", "012", "013", "014", "015", "016", "017", "018", "019", "020"]

unlabeled_pool = "tr20"
upper_bound = "tr20"
