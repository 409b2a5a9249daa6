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

# Calibration sentences for GPTQ (`minilm.calibration_batches`, docs/gptq.md): none of them
# is in SENTENCES, and most of their topics are not either, so the accuracy measured on
# SENTENCES is measured on data the quantiser never saw. 16 topics x 6.
CALIBRATION: tuple[str, ...] = (
    # travel
    "We missed our connecting flight and spent the night at the airport.",
    "The hotel room had a balcony overlooking the old harbour.",
    "Remember to renew your passport at least three months before the trip.",
    "The night train from Vienna arrives in Venice early in the morning.",
    "Backpackers often stay in hostels to save money.",
    "Is there a bus from the station to the city centre?",
    # history
    "The Roman Empire built roads that connected its distant provinces.",
    "The printing press changed how ideas spread across Europe.",
    "After the war, the city was rebuilt almost from scratch.",
    "Medieval castles were designed to withstand long sieges.",
    "Historians still argue about the causes of the revolution.",
    "The ancient library held thousands of handwritten scrolls.",
    # biology and nature
    "Bees pollinate many of the crops that we eat.",
    "The forest floor was covered with moss and fallen leaves.",
    "Whales migrate thousands of kilometres every year.",
    "Cells divide by copying their DNA and splitting in two.",
    "Wolves hunt in packs and share the food with their young.",
    "Coral reefs are dying as the oceans grow warmer.",
    # shopping and money at home
    "I returned the shoes because they were half a size too small.",
    "The supermarket is offering two for one on pasta this week.",
    "She compared prices online before buying a new washing machine.",
    "Our electricity bill doubled over the winter.",
    "He keeps the receipts in a shoebox under the bed.",
    "Can I pay by card, or do you only take cash?",
    # technology and gadgets
    "My phone battery drains quickly when the screen is bright.",
    "The laptop would not start after the latest update.",
    "Smart speakers can turn the lights on with a voice command.",
    "The printer ran out of ink in the middle of the report.",
    "Back up your photos before you reset the tablet.",
    "The new headphones cancel almost all the noise on the train.",
    # education
    "The students handed in their essays on Friday afternoon.",
    "She is studying chemistry at a university in Scotland.",
    "The teacher explained fractions with slices of pizza.",
    "Exams start next week, so the library is full every evening.",
    "He failed his driving test twice before he passed.",
    "Online courses let adults learn at their own pace.",
    # work and office
    "The meeting was moved to Thursday because the manager was ill.",
    "I have to finish the quarterly report by the end of the day.",
    "Our office switched to a four-day week last spring.",
    "She asked for a raise after leading the project for a year.",
    "The printer on the third floor jams every morning.",
    "New employees shadow a colleague during their first week.",
    # family and feelings
    "My grandmother tells the same stories every Sunday dinner.",
    "He was nervous before asking her to marry him.",
    "The children built a fort out of blankets and chairs.",
    "I felt lonely during my first months in a new city.",
    "They adopted a puppy from the local shelter.",
    "Her brother always forgets her birthday.",
    # transport and cities
    "Traffic on the ring road was at a standstill for an hour.",
    "The city plans to add more bicycle lanes next year.",
    "Electric scooters are parked on every street corner.",
    "The underground was closed because of a signal failure.",
    "Parking in the city centre costs a fortune.",
    "A new bridge will connect the two sides of the river.",
    # law and politics
    "The court ruled that the contract was not valid.",
    "Parliament will vote on the new budget next month.",
    "The mayor promised to build more affordable housing.",
    "A jury found the defendant not guilty of fraud.",
    "Voters queued for hours outside the polling stations.",
    "The new law bans smoking in public parks.",
    # art and literature
    "The museum opened an exhibition of early photographs.",
    "Her first novel was translated into twenty languages.",
    "He paints landscapes in watercolour every weekend.",
    "The poem describes the sea at night.",
    "Critics praised the film for its striking cinematography.",
    "The sculpture was carved from a single block of marble.",
    # home and garden
    "The kitchen tap has been dripping for a week.",
    "We painted the bedroom a pale shade of green.",
    "Tomatoes grow best in a sunny, sheltered spot.",
    "The dishwasher leaves white marks on the glasses.",
    "He mowed the lawn before the guests arrived.",
    "Our neighbours are building an extension at the back.",
    # other sports
    "She swam across the lake in under an hour.",
    "The tennis match went to a fifth set.",
    "He trains for marathons by running before work.",
    "The cycling race climbs three mountain passes.",
    "Basketball players need quick reflexes and good balance.",
    "The skier crashed on the final turn of the course.",
    # physics and chemistry
    "Water boils at a lower temperature high in the mountains.",
    "Light travels faster than sound.",
    "Salt dissolves more quickly in warm water.",
    "Magnets attract iron but not aluminium.",
    "The experiment measured how fast the ball fell.",
    "Atoms are mostly empty space.",
    # questions and requests
    "Could you send me the address of the restaurant?",
    "What time does the pharmacy close on Saturdays?",
    "Please remind me to call the dentist tomorrow.",
    "Why is the sky blue during the day and red at sunset?",
    "How many people live in Tokyo?",
    "Where did you put the spare keys?",
    # short and informal
    "Thanks, see you later!",
    "I can't believe it's already December.",
    "That was the best pizza I've ever had.",
    "No worries, it happens.",
    "Let's grab a coffee sometime next week.",
    "Ugh, Monday again.",
)
