"""Built-in sentences for the demo and the accuracy tests: 8 topics of 4 sentences, so that
nearest-neighbour retrieval has a right answer (another sentence of the same topic)."""

SENTENCES: tuple[str, ...] = (
    # cooking
    "How do I bake a loaf of sourdough bread at home?",
    "The recipe needs flour, water, salt and a mature starter.",
    "Knead the dough for ten minutes, then let it rise overnight.",
    "My cake collapsed in the oven because I opened the door too early.",
    # football
    "The striker scored twice in the second half to win the match.",
    "Our team lost the cup final on penalties last night.",
    "The goalkeeper saved a penalty in the ninetieth minute.",
    "Football fans filled the stadium hours before kick-off.",
    # finance
    "The stock market fell sharply after the central bank raised interest rates.",
    "Investors moved their savings into government bonds.",
    "Inflation rose to 4% in October, the highest in a decade.",
    "The company's quarterly profits beat analysts' expectations.",
    # space
    "The rocket launched the satellite into a low Earth orbit.",
    "Astronomers discovered a planet orbiting a distant star.",
    "Astronauts on the space station grew lettuce in microgravity.",
    "A probe landed on Mars to search for signs of ancient life.",
    # programming
    "This Python function raises a KeyError when the dictionary is empty.",
    "Compile the code with optimisations enabled to make it run faster.",
    "The unit tests fail because of a race condition between two threads.",
    "Use a hash map to look up each element in constant time.",
    # weather
    "Heavy rain and strong winds are expected across the north tomorrow.",
    "It was sunny and warm all weekend, perfect for the beach.",
    "The forecast says snow will fall overnight in the mountains.",
    "A thunderstorm knocked out power to thousands of homes.",
    # health
    "Regular exercise lowers the risk of heart disease.",
    "The doctor prescribed antibiotics for the infection.",
    "Drinking enough water helps you stay focused during the day.",
    "Sleep deprivation weakens the immune system.",
    # music
    "She plays the violin in the city's symphony orchestra.",
    "The band released their new album on Friday.",
    "He learned to play guitar by watching videos online.",
    "The concert sold out within minutes of tickets going on sale.",
)
