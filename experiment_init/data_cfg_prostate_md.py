"""Patient splits for Decathlon prostate (the published experiments' lists).

Ids are 3 digits: '000' is prostate_00.

labeled[<tr>_<comb>] are the labeled training volumes, validation[<tr>_<comb>] pick the best
checkpoint, test is held out, unlabeled_pool names the labeled-dict entry whose volumes get
pseudo-labels in joint training (it overlaps the labeled lists, as in the original).
Add a combination by adding matching keys to `labeled` and `validation`.
The original 'trall' list fused '000' and '001' into '000001' (a missing comma); fixed here.
"""

labeled = {
    "tr1_c1": ["001"],
    "tr1_c2": ["002"],
    "tr1_c3": ["006"],
    "tr1_c4": ["000"],
    "tr1_c5": ["004"],
    "tr2_c1": ["000", "001"],
    "tr2_c2": ["021", "024"],
    "tr2_c3": ["001", "002"],
    "tr2_c4": ["004", "010"],
    "tr2_c5": ["000", "007"],
    "tr8_c1": ["000", "001", "002", "004", "006", "007", "010", "016"],
    "tr8_c2": ["002", "004", "006", "007", "010", "016", "021", "018"],
    "tr8_c3": ["000", "001", "006", "007", "010", "017", "018", "024"],
    "tr10_c1": ["000", "001", "002", "004", "006", "007", "010", "016", "017", "018"],
    "tr10_c2": ["000", "001", "002", "004", "006", "007", "010", "016", "021", "018"],
    "tr10_c3": ["000", "001", "002", "004", "006", "007", "010", "016", "024", "018"],
    "tr22": [
        "000",
        "001",
        "002",
        "004",
        "006",
        "007",
        "010",
        "013",
        "014",
        "016",
        "017",
        "018",
        "020",
        "021",
        "024",
        "025",
        "028",
    ],
    "trall": [
        "000",
        "001",
        "002",
        "004",
        "006",
        "007",
        "010",
        "016",
        "017",
        "018",
        "020",
        "021",
        "024",
        "025",
        "028",
    ],
}

validation = {
    "tr1_c1": ["013", "014"],
    "tr1_c2": ["017", "020"],
    "tr1_c3": ["025", "028"],
    "tr1_c4": ["013", "014"],
    "tr1_c5": ["025", "028"],
    "tr2_c1": ["013", "014"],
    "tr2_c2": ["017", "020"],
    "tr2_c3": ["025", "028"],
    "tr2_c4": ["013", "014"],
    "tr2_c5": ["025", "028"],
    "tr8_c1": ["013", "014"],
    "tr8_c2": ["017", "020"],
    "tr8_c3": ["025", "028"],
    "tr10_c1": ["013", "014"],
    "tr10_c2": ["017", "020"],
    "tr10_c3": ["025", "028"],
    "tr22": ["013", "014", "020", "028"],
    "trall": ["013", "014"],
}

test = [
    "029",
    "031",
    "032",
    "034",
    "035",
    "037",
    "038",
    "039",
    "040",
    "041",
    "042",
    "043",
    "044",
    "046",
    "047",
]

unlabeled_pool = "tr22"
upper_bound = "trall"
